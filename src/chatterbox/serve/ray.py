"""The speech server on Ray Serve: the same app, one replica per GPU, autoscaled on ongoing requests,
with the voices directory shared by every replica (a path on shared storage).

    python -m chatterbox.serve.ray --pretrained --voices-dir /shared/voices --max-replicas 8
    serve run chatterbox.serve.ray:app_builder pretrained=true voices_dir=/shared/voices max_replicas=8

Both take the options of ``chatterbox-tts serve`` (``serve run`` as ``key=value`` pairs, dashes
written as underscores) plus the replica options below. Each replica loads the model on the GPU Ray
assigns it (on the CPU when it has none), warms it up, and only then takes requests. Ray Serve's
proxy spreads requests over the replicas; inside a replica, requests queue and are admitted as in the
single-process server.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from dataclasses import dataclass

try:
    import ray
    from ray import serve
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError("the Ray Serve deployment needs the 'ray' extra: pip install 'chatterbox-fast[ray]'") from exc

from .app import create_app
from .config import ModelSpec, ServerConfig
from .loading import load_engines
from .service import SpeechService

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayConfig:
    min_replicas: int = 1
    max_replicas: int = 1
    # Ongoing requests per replica the autoscaler aims for (replicas are added above it).
    target_ongoing_requests: int = 16
    gpus_per_replica: float = 1.0
    cpus_per_replica: float = 1.0
    app_name: str = "chatterbox"
    deployment_name: str = "ChatterboxTTS"

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                             f"{self.min_replicas}, {self.max_replicas}")
        if self.target_ongoing_requests < 1 or self.gpus_per_replica < 0 or self.cpus_per_replica < 0:
            raise ValueError("target_ongoing_requests must be >= 1 and the resources per replica >= 0")

    @classmethod
    def published(cls) -> "RayConfig":
        return cls()


@serve.ingress()
class ChatterboxReplica:
    """One replica: a ``SpeechService`` on the replica's device, loaded and warmed up before Ray routes
    requests to it."""

    def __init__(self, config: ServerConfig, specs: ModelSpec | tuple[ModelSpec, ...]) -> None:
        specs = (specs,) if isinstance(specs, ModelSpec) else tuple(specs)
        if ray.get_gpu_ids():  # Ray exposes the assigned GPU as the only visible one
            specs = tuple(dataclasses.replace(spec, devices=("cuda",)) for spec in specs)
        self.service = SpeechService(config, loader=lambda: load_engines(specs),
                                     families=tuple(s.family for s in specs))
        self.service.load()

    def __serve_build_asgi_app__(self):
        return create_app(self.service, load_on_startup=False)

    def check_health(self) -> None:
        if not self.service.ready:
            raise RuntimeError(f"speech service not ready: {self.service.state} {self.service.error or ''}")


def build_application(config: ServerConfig, specs: ModelSpec | tuple[ModelSpec, ...], ray_cfg: RayConfig):
    """The Ray Serve application (``serve.run`` it, or return it from an app builder); every replica
    loads every model family of ``specs``."""
    deployment = serve.deployment(
        ChatterboxReplica, name=ray_cfg.deployment_name,
        ray_actor_options={"num_gpus": ray_cfg.gpus_per_replica, "num_cpus": ray_cfg.cpus_per_replica},
        max_ongoing_requests=config.max_concurrent + config.max_queue,
        autoscaling_config={"min_replicas": ray_cfg.min_replicas, "max_replicas": ray_cfg.max_replicas,
                            "initial_replicas": max(ray_cfg.min_replicas, 1),
                            "target_ongoing_requests": ray_cfg.target_ongoing_requests})
    return deployment.bind(config, specs)


def build_parser() -> argparse.ArgumentParser:
    from .cli import build_parser as server_parser

    ap = server_parser()
    ap.prog = "python -m chatterbox.serve.ray"
    ap.description = "Chatterbox's speech server on Ray Serve: one replica per GPU, autoscaled."
    d = RayConfig.published()
    ap.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    ap.add_argument("--min-replicas", type=int, default=d.min_replicas, help="replicas kept running")
    ap.add_argument("--max-replicas", type=int, default=d.max_replicas, help="most replicas (one GPU each)")
    ap.add_argument("--target-ongoing-requests", type=int, default=d.target_ongoing_requests,
                    help="ongoing requests per replica the autoscaler aims for")
    ap.add_argument("--gpus-per-replica", type=float, default=d.gpus_per_replica,
                    help="GPUs per replica; 0 runs replicas on the CPU")
    ap.add_argument("--cpus-per-replica", type=float, default=d.cpus_per_replica)
    return ap


def parse(argv: list[str]) -> tuple[argparse.Namespace, ServerConfig, tuple[ModelSpec, ...], RayConfig]:
    from ..cli import UsageError
    from .cli import prepare

    args = build_parser().parse_args(argv)
    if args.device or args.devices:
        raise UsageError("on Ray each replica uses the GPU Ray assigns it: drop --device/--devices "
                         "(--gpus-per-replica 0 runs replicas on the CPU)")
    args.device = "cpu"  # replaced by the replica's GPU when Ray assigns one
    config, specs = prepare(args)
    try:
        ray_cfg = RayConfig(min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                            target_ongoing_requests=args.target_ongoing_requests,
                            gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return args, config, specs, ray_cfg


def args_to_argv(args: dict) -> list[str]:
    """``serve run``'s ``key=value`` pairs as command-line options (``true``/``false`` for flags)."""
    argv = []
    for key, value in args.items():
        option = "--" + str(key).replace("_", "-")
        text = str(value)
        if text.lower() in ("true", "false"):
            if text.lower() == "true":
                argv.append(option)
            continue
        for item in (text.split(",") if key in ("api_key", "api_keys") else [text]):
            argv += ["--api-key" if key in ("api_key", "api_keys") else option, item]
    return argv


def app_builder(args: dict):
    """For ``serve run chatterbox.serve.ray:app_builder key=value ...``."""
    _, config, specs, ray_cfg = parse(args_to_argv(args))
    return build_application(config, specs, ray_cfg)


def main(argv: list[str] | None = None) -> int:
    from ..cli import run_guarded

    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def run(_) -> int:
        args, config, specs, ray_cfg = parse(argv)
        ray.init(address=args.address)
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build_application(config, specs, ray_cfg), name=ray_cfg.app_name, route_prefix="/", blocking=True)
        return 0

    return run_guarded(argparse.Namespace(debug="--debug" in argv), run)


if __name__ == "__main__":
    sys.exit(main())
