"""optuna-dashboard on a study: the server, over its storage and the artifacts the run wrote (hpo.study.artifacts)."""

from __future__ import annotations

import ipaddress

from hpo.config import StudyConfig
from hpo.study.artifacts import artifact_store


def exposed(host: str) -> bool:
    """Whether binding ``host`` reaches beyond this machine (anything but a loopback address)."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: assume it resolves to something reachable
        return True


def serve(cfg: StudyConfig, host: str, port: int) -> None:
    """Run optuna-dashboard on the study's storage and artifact store until interrupted.

    Raises:
        ConfigError: the output folder, where the artifacts are, is not hpo's to write in.
    """
    from optuna_dashboard import run_server

    from hpo.trial.folders import claim_paths

    claim_paths(cfg, cfg.output_path / "artifacts")  # a folder the dashboard made would not be the study's

    run_server(cfg.storage_url, host=host, port=port, artifact_store=artifact_store(cfg))
