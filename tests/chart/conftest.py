"""Shows what the chart tests read before they run."""
import chart_inputs as inputs


def pytest_report_header(config):
    try:
        return [f"chart tests: Kubernetes {' '.join(inputs.kubernetes_versions())}, "
                f"inputs in {inputs.work()}, helm {inputs.env('CHART_CHECKS_HELM')}"]
    except inputs.InputError as e:
        return [f"chart tests: {e}"]
