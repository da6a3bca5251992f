"""The container and Kubernetes files agree with each other and with the server.

No Docker engine or cluster here: the files are parsed, not run.
"""

import importlib.metadata
import re
from pathlib import Path

import yaml

from seqserve.server.config import Config
from seqserve.server.discovery import HEALTH_NAMES

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def dockerfile_env() -> dict[str, str]:
    block = re.search(r"^ENV (.*?)(?=^\S)", DOCKERFILE, re.M | re.S).group(1)
    return dict(re.findall(r"(\w+)=(\S+)", block))


def manifests() -> dict[str, dict]:
    return {
        doc["kind"]: doc
        for path in sorted((REPO / "deploy").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if isinstance(doc, dict)
    }


def test_dockerfile_is_multi_stage_non_root_with_a_health_check():
    assert len(re.findall(r"^FROM ", DOCKERFILE, re.M)) == 2
    assert "COPY --from=build" in DOCKERFILE
    assert re.search(r"^USER 10001$", DOCKERFILE, re.M)
    assert re.search(r"^COPY models models$", DOCKERFILE, re.M)
    check = re.search(r"^HEALTHCHECK .*?CMD \[(.*?)\]", DOCKERFILE, re.M | re.S)
    command = check.group(1).replace('"', "").split(", ")
    (script,) = importlib.metadata.entry_points(
        group="console_scripts", name=command[0]
    )
    assert script.value == "seqserve.server.healthcheck:main"
    env = dockerfile_env()
    assert command[1] == f"--address=127.0.0.1:{env['SEQSERVE_PORT']}"
    assert Config.from_args([], environ=env).host == "0.0.0.0"


def test_ports_agree_across_dockerfile_readme_and_manifests():
    env = dockerfile_env()
    grpc_port, metrics_port = (
        int(env["SEQSERVE_PORT"]),
        int(env["SEQSERVE_METRICS_PORT"]),
    )
    exposed = re.search(r"^EXPOSE (.*)$", DOCKERFILE, re.M).group(1).split()
    assert [int(p) for p in exposed] == [grpc_port, metrics_port]
    readme = (REPO / "README.md").read_text()
    assert f"-p {grpc_port}:{grpc_port} -p {metrics_port}:{metrics_port}" in readme

    pod = manifests()["Deployment"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": grpc_port, "metrics": metrics_port}
    env_in_pod = {e["name"]: e["value"] for e in container["env"]}
    assert env_in_pod["SEQSERVE_PORT"] == str(grpc_port)
    assert env_in_pod["SEQSERVE_METRICS_PORT"] == str(metrics_port)
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(metrics_port)
    service = manifests()["Service"]["spec"]
    assert {p["name"]: p["port"] for p in service["ports"]} == ports


def test_probes_ask_the_grpc_health_service_for_names_it_knows():
    container = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        check = container[probe]["grpc"]
        assert check["port"] == int(dockerfile_env()["SEQSERVE_PORT"])
        assert check.get("service", "") in HEALTH_NAMES
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]


def test_scrape_config_keeps_annotated_pods():
    path = REPO / "deploy" / "prometheus-scrape.yaml"
    (job,) = yaml.safe_load(path.read_text())
    assert job["job_name"] == "seqserve"
    kept = [r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"]
    assert kept == ["seqserve", "true"]
