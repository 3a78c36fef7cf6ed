{{/*
Object names are fixed, not derived from the release name: the operator and the agent look for
them (Lease regmirror-controller, Role regmirror-agent-configs), the admission policy names the
agent's ServiceAccount, and the CRD is cluster-wide anyway. One installation per cluster.
*/}}

{{- define "regmirror.chart" -}}
{{ .Chart.Name }}-{{ .Chart.Version | replace "+" "_" }}
{{- end }}

{{- define "regmirror.labels" -}}
helm.sh/chart: {{ include "regmirror.chart" .root }}
app.kubernetes.io/name: regmirror
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: regmirror
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{- define "regmirror.selectorLabels" -}}
app.kubernetes.io/name: regmirror
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* image reference: repository[:tag][@digest]; tag defaults to the chart's appVersion */}}
{{- define "regmirror.image" -}}
{{- if .image.digest -}}
{{ .image.repository }}@{{ .image.digest }}
{{- else -}}
{{ .image.repository }}:{{ .image.tag | default .root.Chart.AppVersion }}
{{- end -}}
{{- end }}

{{- define "regmirror.operatorServiceAccount" -}}regmirror-operator{{- end }}
{{- define "regmirror.agentServiceAccount" -}}regmirror-agent{{- end }}

{{/* The user name the API server gives the agent's ServiceAccount tokens. */}}
{{- define "regmirror.agentUsername" -}}
system:serviceaccount:{{ .Release.Namespace }}:{{ include "regmirror.agentServiceAccount" . }}
{{- end }}

{{/* allowedNamespaces without duplicates and without the release namespace itself. */}}
{{- define "regmirror.extraNamespaces" -}}
{{- $out := list -}}
{{- range .Values.allowedNamespaces -}}
{{- if and (ne . $.Release.Namespace) (not (has . $out)) -}}
{{- $out = append $out . -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end }}

{{/* volume name for a host path: /usr/lib/systemd/system -> host-usr-lib-systemd-system */}}
{{- define "regmirror.hostVolumeName" -}}
{{- printf "host-%s" (. | trimPrefix "/" | replace "/" "-" | replace "." "-" | replace "_" "-" | lower) | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{/* cache.<key>, or a failure saying how to get it (an upgrade with --reuse-values leaves out
values a release adds, such as cache) */}}
{{- define "regmirror.cacheValue" -}}
{{- $cache := .root.Values.cache | default dict -}}
{{- required (printf "cache.%s is not set: upgrade with --reset-then-reuse-values, since --reuse-values leaves out values a release adds" .key) (get $cache .key) -}}
{{- end }}
