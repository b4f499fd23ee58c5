"""`kvflight serve`: validates the config, loads the tokenizer, starts the engine core, runs uvicorn, and drains
in-flight requests on SIGTERM / Ctrl-C before exiting 0."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

from kvflight.config import EngineConfig

logger = logging.getLogger("kvflight.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_QUEUE_LEN = 4096


def add_serve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST})")
    g.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default: {DEFAULT_PORT})")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 and /v2 (default: no auth)")
    g.add_argument("--max-queue-len", type=int, default=DEFAULT_MAX_QUEUE_LEN, metavar="N",
                   help="most requests in flight; more are answered 503 (default: %(default)s)")
    g.add_argument("--request-timeout", type=float, default=None, metavar="S",
                   help="abort a request after S seconds (default: no limit)")
    g.add_argument("--graceful-shutdown-timeout", type=float, default=None, metavar="S",
                   help="on SIGTERM, wait at most S seconds for in-flight requests (default: until they finish)")


class _DrainingServer:
    """uvicorn.Server that also flips the app to 'draining' (503 for new requests) when a signal arrives."""

    @staticmethod
    def make(config: Any, state: Any) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                state.draining = True
                super().handle_exit(sig, frame)

        return Server(config)


def run_serve(args: argparse.Namespace, flat: dict[str, Any]) -> int:
    """Returns the exit code: 0 after a clean shutdown, 2 for a bad config or model (message printed, no traceback)."""
    import uvicorn

    from kvflight.model.loader import load_tokenizer, resolve_model
    from kvflight.server.api import ServerSettings, build_app
    from kvflight.server.async_client import AsyncEngineClient, EngineStartError
    from kvflight.server.engine_core import freeze_startup_objects
    from kvflight.server.metrics import ServerMetrics

    if args.max_queue_len < 1:
        print(f"kvflight: error: --max-queue-len={args.max_queue_len}: must be >= 1", file=sys.stderr)
        return 2
    if args.request_timeout is not None and args.request_timeout <= 0:
        print(f"kvflight: error: --request-timeout={args.request_timeout}: must be > 0 seconds", file=sys.stderr)
        return 2
    config = EngineConfig.from_flat(flat)  # ConfigError -> exit 2 in cli.main
    resolved = resolve_model(config.model.model, config.model.load_format)
    log_level = logging.getLevelName(logging.getLogger().level)
    client = AsyncEngineClient(flat, None, log_level=log_level if isinstance(log_level, str) else "INFO")
    client.start_process()  # the core loads the model while we load the tokenizer
    try:
        client.tokenizer = load_tokenizer(resolved, config.model.tokenizer)
        info = client.wait_ready()
    except (EngineStartError, ValueError) as exc:
        client.kill()
        client.close_sockets()
        print(f"kvflight: error: {exc}", file=sys.stderr)
        return 2
    except BaseException:
        client.kill()
        client.close_sockets()
        raise
    name = config.model.served_model_name or info.served_model_name
    metrics = ServerMetrics(name)
    client.metrics = metrics
    settings = ServerSettings(served_model_name=name, api_key=args.api_key, max_queue_len=args.max_queue_len,
                              request_timeout_s=args.request_timeout)
    app = build_app(client, settings, metrics)
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                               timeout_graceful_shutdown=args.graceful_shutdown_timeout, lifespan="on")
    server = _DrainingServer.make(uv_config, app.state.kvflight)
    freeze_startup_objects()
    # uvicorn re-raises the signal that stopped it once it has drained; these no-op handlers make that a clean exit
    # (code 0) instead of death by SIGTERM.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    logger.info("serving %s on http://%s:%d (max_seq_len=%d, KV blocks=%d)", name, args.host, args.port,
                info.max_seq_len, info.num_kv_blocks)
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        client.kill()
        client.close_sockets()
    if client.dead_reason is not None and not server.started:
        return 1
    logger.info("server stopped")
    return 0
