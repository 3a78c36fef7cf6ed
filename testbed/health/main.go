// regmirror-health judges live RegistryMirror objects the way GitOps tools do, with their own
// code: Flux's kstatus library (sigs.k8s.io/cli-utils/pkg/kstatus/status, what Flux's
// Kustomization health checks and `kstatus` wait on) and an Argo CD Lua health check run by
// github.com/yuin/gopher-lua, the interpreter Argo CD embeds, set up as Argo CD sets it up for a
// health check from argocd-cm (standard libraries off except package, base and table; obj as a
// global; one second to run; the status must be one Argo CD knows).
//
// Usage:
//
//	regmirror-health --argocd-cm FILE < objects.json
//
// stdin holds one object or a list (`items`), as `kubectl get -o json` prints them. FILE is an
// argocd-cm ConfigMap (YAML) holding resource.customizations.health.<group>_<kind> for the
// objects' kind. stdout is one JSON object keyed by metadata.name:
//
//	{"docker-hub": {"kstatus": {"status": "Current", "message": "..."},
//	                "argocd": {"status": "Healthy", "message": "..."}}}
//
// Not part of regmirror: a test tool (see testbed/health/build).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	lua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
	"sigs.k8s.io/yaml"
)

type verdict struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

type judgement struct {
	Kstatus verdict `json:"kstatus"`
	Argocd  verdict `json:"argocd"`
}

func main() {
	argocdCM := flag.String("argocd-cm", "", "argocd-cm ConfigMap (YAML) with the health customization")
	flag.Parse()
	if *argocdCM == "" {
		fail("--argocd-cm is required")
	}
	input, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail("read stdin: %v", err)
	}
	var doc map[string]interface{}
	if err := json.Unmarshal(input, &doc); err != nil {
		fail("stdin is not a JSON object: %v", err)
	}
	var objects []*unstructured.Unstructured
	if items, ok := doc["items"].([]interface{}); ok {
		for _, item := range items {
			m, ok := item.(map[string]interface{})
			if !ok {
				fail("an item is not an object")
			}
			objects = append(objects, &unstructured.Unstructured{Object: m})
		}
	} else {
		objects = append(objects, &unstructured.Unstructured{Object: doc})
	}
	// Through the same decoder the API machinery uses, so numbers are int64 as in Argo CD's
	// controller, not float64.
	for i, o := range objects {
		raw, err := json.Marshal(o.Object)
		if err != nil {
			fail("%v", err)
		}
		u := &unstructured.Unstructured{}
		if err := u.UnmarshalJSON(raw); err != nil {
			fail("object %d: %v", i, err)
		}
		objects[i] = u
	}

	out := map[string]judgement{}
	for _, o := range objects {
		script, err := healthScript(*argocdCM, o)
		if err != nil {
			fail("%v", err)
		}
		var j judgement
		result, err := status.Compute(o)
		if err != nil {
			j.Kstatus = verdict{Status: "Error", Message: err.Error()}
		} else {
			j.Kstatus = verdict{Status: result.Status.String(), Message: result.Message}
		}
		j.Argocd = argoHealth(o, script)
		out[o.GetName()] = j
	}
	encoded, err := json.Marshal(out)
	if err != nil {
		fail("%v", err)
	}
	fmt.Println(string(encoded))
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "regmirror-health: "+format+"\n", args...)
	os.Exit(2)
}

// healthScript reads the health customization for the object's kind from an argocd-cm
// ConfigMap: the key resource.customizations.health.<group>_<kind>.
func healthScript(path string, o *unstructured.Unstructured) (string, error) {
	text, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	var cm struct {
		Data map[string]string `json:"data"`
	}
	if err := yaml.Unmarshal(text, &cm); err != nil {
		return "", fmt.Errorf("%s: %v", path, err)
	}
	gvk := o.GroupVersionKind()
	key := "resource.customizations.health." + gvk.Kind
	if gvk.Group != "" {
		key = "resource.customizations.health." + gvk.Group + "_" + gvk.Kind
	}
	script, ok := cm.Data[key]
	if !ok || strings.TrimSpace(script) == "" {
		return "", fmt.Errorf("%s has no %s", path, key)
	}
	return script, nil
}

// argoHealth runs an argocd-cm health script as Argo CD does for a customization without
// useOpenLibs.
func argoHealth(o *unstructured.Unstructured, script string) verdict {
	l := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer l.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
	} {
		if err := l.CallByParam(lua.P{Fn: l.NewFunction(lib.open), NRet: 0, Protect: true}, lua.LString(lib.name)); err != nil {
			return verdict{Status: "Error", Message: fmt.Sprintf("open %s: %v", lib.name, err)}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	l.SetContext(ctx)
	l.SetGlobal("obj", toLua(l, o.Object))
	if err := l.DoString(script); err != nil {
		return verdict{Status: "Error", Message: err.Error()}
	}
	returned := l.Get(-1)
	table, ok := returned.(*lua.LTable)
	if !ok {
		return verdict{Status: "Error", Message: "expect table output from Lua script, not " + returned.Type().String()}
	}
	field := func(name string) string {
		if s, ok := table.RawGetString(name).(lua.LString); ok {
			return string(s)
		}
		return ""
	}
	code := field("status")
	switch code {
	case "Unknown", "Progressing", "Suspended", "Healthy", "Degraded", "Missing":
		return verdict{Status: code, Message: field("message")}
	}
	// What Argo CD shows for a status it does not know.
	return verdict{Status: "Unknown", Message: "Lua returned an invalid health status"}
}

// toLua converts decoded JSON as Argo CD does: objects and arrays become tables, numbers
// (int64 from the API machinery's decoder, or float64) become numbers.
func toLua(l *lua.LState, value interface{}) lua.LValue {
	switch v := value.(type) {
	case nil:
		return lua.LNil
	case bool:
		return lua.LBool(v)
	case string:
		return lua.LString(v)
	case json.Number:
		return lua.LString(v)
	case float64:
		return lua.LNumber(v)
	case int64:
		return lua.LNumber(v)
	case int:
		return lua.LNumber(v)
	case []interface{}:
		t := l.CreateTable(len(v), 0)
		for _, item := range v {
			t.Append(toLua(l, item))
		}
		return t
	case map[string]interface{}:
		t := l.CreateTable(0, len(v))
		for k, item := range v {
			t.RawSetH(lua.LString(k), toLua(l, item))
		}
		return t
	}
	return lua.LNil
}
