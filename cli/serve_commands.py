"""`perm serve`: the HTTP API (the `serve` extra)."""

from __future__ import annotations

import math
import os
from typing import Annotated

import typer
from perm_lite.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    MAX_BATCH_TOKENS_HELP,
    ProviderChoice,
    err,
    fail,
    max_batch_tokens_option,
    parse_mapping,
)

from perm_lite.errors import OptionError, PermError


def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0 for all).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free port).")] = 8000,
    model: Annotated[str, typer.Option(help="Catalogue name, model directory, or owner/repo@revision.")] = "default",
    threads: Annotated[int | None, typer.Option(min=1, help="Intra-op threads (default: available cores).")] = None,
    provider: Annotated[ProviderChoice, typer.Option(help="Execution provider.")] = ProviderChoice.auto,
    max_batch_tokens: Annotated[int | None, typer.Option(min=1, help=MAX_BATCH_TOKENS_HELP)] = None,
    threshold: Annotated[
        str | None, typer.Option(help="Default /v1/check thresholds, e.g. reception=2.5,combined=0.3.")
    ] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Most records merged into one inference.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="Longest wait for more requests to merge.")] = 5.0,
    queue_size: Annotated[int, typer.Option(min=1, help="Requests waiting before 503.")] = 64,
    max_records: Annotated[int, typer.Option(min=1, help="Records per /v1/score request.")] = 256,
    max_body_kb: Annotated[int, typer.Option(min=1, help="Request body limit in KiB.")] = 1024,
    max_queue_records: Annotated[
        int, typer.Option(min=1, help="Records held by requests waiting or being scored before 503.")
    ] = 4096,
    max_queue_chars: Annotated[
        int,
        typer.Option(
            min=1, help="Characters (request-body bytes) held by requests being read, waiting or scored before 503."
        ),
    ] = 16_000_000,
    shutdown_timeout: Annotated[
        float, typer.Option(min=0, help="On SIGTERM, seconds to answer accepted requests; the rest get 503.")
    ] = 10.0,
    body_timeout: Annotated[
        float, typer.Option(min=0.001, help="Seconds a request body may take to arrive before 408.")
    ] = 30.0,
    max_explain_variants: Annotated[
        int | None,
        typer.Option(
            min=2,
            help="Forward passes per /v1/explain or flagged /v1/check, the full reply included "
            "(default: 65, or --max-records when lower; /v1/explain answers 413 above it).",
        ),
    ] = None,
    auth_token_env: Annotated[
        str | None,
        typer.Option(help="Environment variable holding an API key; requests then need Authorization: Bearer KEY."),
    ] = None,
    docs: Annotated[
        bool, typer.Option(help="Serve /docs and /redoc (their JavaScript and CSS load from a CDN).")
    ] = False,
) -> None:
    """HTTP API: POST /v1/score, POST /v1/check, POST /v1/explain, GET /healthz, GET /v1/model (serve extra)."""
    from perm_lite.scorer import Scorer

    try:
        import uvicorn  # noqa: F401

        from perm_lite.serve.app import create_app
        from perm_lite.serve.server import bind
        from perm_lite.serve.server import serve as serve_app
    except ImportError as exc:
        raise fail(f"perm serve needs the serve extra: pip install '.[serve]' in the checkout ({exc})") from None
    thresholds = {}
    for name, value in parse_mapping(threshold, "--threshold").items():
        try:
            thresholds[name] = float(value)
        except ValueError:
            raise fail(f"--threshold {name}={value!r}: not a number", EXIT_USAGE) from None
        if not math.isfinite(thresholds[name]):
            raise fail(f"--threshold {name}={value!r}: not a finite number", EXIT_USAGE)
    auth_token = None
    if auth_token_env is not None:
        auth_token = os.environ.get(auth_token_env, "").strip()
        if not auth_token:
            raise fail(f"--auth-token-env {auth_token_env}: ${auth_token_env} is not set or empty", EXIT_USAGE)
    try:
        sock = bind(host, port)  # before the model loads: a busy port is one line, exit 1
    except PermError as exc:
        raise fail(str(exc)) from None
    try:
        scorer = Scorer(
            model,
            provider=provider.value,
            threads=threads,
            max_batch_tokens=max_batch_tokens_option(max_batch_tokens),
        )
        app_ = create_app(
            scorer,
            thresholds=thresholds or None,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            queue_size=queue_size,
            max_body_bytes=max_body_kb * 1024,
            max_records=max_records,
            max_queue_records=max_queue_records,
            max_queue_chars=max_queue_chars,
            shutdown_timeout=shutdown_timeout,
            auth_token=auth_token,
            docs=docs,
            body_timeout=body_timeout,
            max_explain_variants=max_explain_variants,
        )
    except OptionError as exc:
        sock.close()
        raise fail(str(exc), EXIT_USAGE) from None
    except PermError as exc:
        sock.close()
        raise fail(str(exc)) from None
    except ValueError as exc:
        sock.close()
        raise fail(str(exc), EXIT_USAGE) from None
    port = sock.getsockname()[1]
    auth = f", API key from ${auth_token_env}" if auth_token else ""
    err(f"perm serve: {scorer.config.name} {scorer.config.version} on {scorer.provider}, http://{host}:{port}{auth}")
    try:
        serve_app(app_, sock, shutdown_timeout)
    except PermError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:  # Ctrl-C: uvicorn re-raises it after its graceful shutdown
        raise typer.Exit(EXIT_INTERRUPTED) from None
