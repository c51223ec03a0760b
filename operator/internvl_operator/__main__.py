"""`internvl-operator`: run the Kopf operator with our handlers.

    internvl-operator                       # namespaces from INTERNVL_OPERATOR_NAMESPACES (empty = cluster-wide)
    internvl-operator --namespace ml        # one namespace
    internvl-operator --peering internvl    # several replicas, one active (needs kopf's peering CRDs)
    python -m internvl_operator.crdgen      # regenerate crds/ (not part of the running operator)
"""

from __future__ import annotations

import argparse
import asyncio
import logging

import kopf

from . import handlers, metrics
from .settings import load_settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="internvl-operator", description="InternVL fine-tune and serving operator")
    parser.add_argument("-n", "--namespace", action="append", default=None, help="namespace to watch (repeatable)")
    parser.add_argument("--peering", default=None, help="kopf peering name; default: standalone (one replica)")
    parser.add_argument("--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings()
    if args.namespace:
        settings.namespaces = args.namespace
    peering = args.peering if args.peering is not None else settings.peering
    # kopf.configure installs the root handler; a logging.basicConfig() next to it printed every line twice.
    kopf.configure(verbose=args.verbose)

    handlers.configure(settings=settings)
    handlers.register(settings=settings)
    metrics.serve(settings.metrics_port)

    @kopf.on.startup()
    def _startup(settings: kopf.OperatorSettings, **_: object) -> None:
        # Our own handlers post Events with user-facing reasons; Kopf's per-handler events would only add noise.
        settings.posting.level = logging.WARNING
        # Sync handlers call the blocking `kubernetes` client; a few threads keep many CRs moving.
        settings.execution.max_workers = 8

    liveness = f"http://0.0.0.0:{settings.liveness_port}/healthz" if settings.liveness_port else None
    asyncio.run(
        kopf.operator(
            standalone=not peering,
            peering_name=peering or None,
            namespaces=settings.namespaces,
            clusterwide=not settings.namespaces,
            liveness_endpoint=liveness,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
