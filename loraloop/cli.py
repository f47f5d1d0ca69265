"""`loraloop` command line: serve, learn, kafka, demo, eval, ope, build-model."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys


def _logging(verbose: bool) -> None:
    import logging

    from loraloop.core.settings import Settings, unknown_env
    from loraloop.core.structured_logs import configure_logging

    settings = Settings()
    configure_logging(
        "INFO" if verbose else settings.log_level,
        settings.log_json,
        access_level=settings.access_log_level,
    )
    for var in unknown_env():
        logging.getLogger("loraloop.settings").warning(
            "%s is set but no loraloop setting reads it", var
        )


def _settings_error(exc: Exception) -> str:
    """A start-up refusal that names the variable and what it accepts."""
    from pydantic import ValidationError

    from loraloop.core.settings import ENV_PREFIX

    if not isinstance(exc, ValidationError):
        return str(exc)
    lines = []
    for error in exc.errors():
        if not error["loc"]:  # a rule across settings; its input is all of them, secrets too
            reason = error.get("ctx", {}).get("error")
            lines.append(f"  {reason if reason is not None else error['msg']}")
            continue
        name = ENV_PREFIX + "_".join(str(part) for part in error["loc"]).upper()
        lines.append(f"  {name}={error.get('input')!r}: {error['msg']}")
    return "invalid settings:\n" + "\n".join(lines)


def _serve(ns: argparse.Namespace) -> int:
    from loraloop.core.settings import Settings
    from loraloop.service.server import serve

    settings = Settings(**({"port": ns.port} if ns.port is not None else {}))
    asyncio.run(serve(settings))
    return 0


def _learn(ns: argparse.Namespace) -> int:
    import signal
    import threading

    from loraloop.core.settings import Settings
    from loraloop.learner.loop import KafkaUnavailableError, Learner

    settings = Settings()
    learner = Learner(settings)
    if settings.learner_metrics_port >= 0:
        from loraloop.core.metrics_exporter import start_metrics_exporter

        exporter = start_metrics_exporter(
            learner.metrics.registry, settings.metrics_host, settings.learner_metrics_port
        )
        print(f"loraloop learner metrics on {exporter.host}:{exporter.port}", flush=True)
    try:
        learner.connect()
    except KafkaUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print("loraloop learner consuming", flush=True)
    try:
        learner.run(stop)
    finally:
        learner.close()
    return 0


def _kafka(ns: argparse.Namespace) -> int:
    from loraloop.kafka_cmd import run_kafka

    return run_kafka(ns.port, ns.data_dir)


def _demo(ns: argparse.Namespace) -> int:
    from loraloop.demo import run_demo

    return run_demo(users=ns.users, rounds=ns.rounds, out_dir=ns.out, learning_rate=ns.lr)


def _eval(ns: argparse.Namespace) -> int:
    from loraloop.eval import run_eval

    return run_eval(
        ns.seeds,
        ns.users,
        ns.rounds,
        ns.out,
        skip_model=ns.skip_model,
        tastes=ns.tastes,
        signals=ns.signals,
    )


def _ope(ns: argparse.Namespace) -> int:
    from loraloop.core.settings import Settings
    from loraloop.learner.ope_report import run_ope

    return run_ope(Settings())


def _build_model(ns: argparse.Namespace) -> int:
    from loraloop.devtools.tiny_model import ensure_tiny_model

    print(ensure_tiny_model())
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="loraloop", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gRPC inference server (settings: LORALOOP_*)")
    p.add_argument("--port", type=int, default=None, help="override LORALOOP_PORT (0 = free)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("learn", help="run the online learner (settings: LORALOOP_*)")
    p.set_defaults(func=_learn)

    p = sub.add_parser("kafka", help="run a local single-node Kafka broker (KRaft)")
    p.add_argument("--port", type=int, default=9092, help="listener port (0 = free)")
    p.add_argument("--data-dir", default=None, help="log directory (default: a temp dir)")
    p.set_defaults(func=_kafka)

    p = sub.add_parser("demo", help="Kafka + server + learner + simulated users, end to end")
    p.add_argument("--users", type=int, default=6, help="simulated users")
    p.add_argument("--rounds", type=int, default=100, help="interactions per user")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate of the LoRA updates (default: LORALOOP_LEARNING_RATE)",
    )
    p.add_argument("--out", default="out/demo", help="where the plot and logs go")
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "eval", help="measure personalization on the demo world over seeds, with intervals"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one run per seed")
    p.add_argument("--users", type=int, default=6, help="simulated users per run")
    p.add_argument("--rounds", type=int, default=100, help="interactions per user")
    p.add_argument("--out", default="out/eval", help="where eval.json and the logs go")
    p.add_argument(
        "--skip-model", action="store_true", help="skip the model's well-formedness report"
    )
    p.add_argument(
        "--tastes",
        choices=["demo", "random"],
        default="demo",
        help="the demo's six tastes, or tastes drawn at random from the attribute space",
    )
    p.add_argument(
        "--signals",
        choices=["demo", "threshold"],
        default="demo",
        help="how simulated users report: the demo's mapping, or another app's thresholds",
    )
    p.set_defaults(func=_eval)

    p = sub.add_parser("ope", help="off-policy estimates of arm policies from the logged events")
    p.set_defaults(func=_ope)

    p = sub.add_parser("build-model", help="build (once) and print the tiny local model")
    p.set_defaults(func=_build_model)

    ns = parser.parse_args(argv)
    from pydantic import ValidationError

    from loraloop.core.settings import StartupError

    try:
        _logging(ns.verbose)
        return int(ns.func(ns))
    except (ValidationError, StartupError) as exc:  # a person must fix it: one line, exit 2
        print(f"loraloop {ns.command}: {_settings_error(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
