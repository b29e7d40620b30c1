"""The controller: a Clash/mihomo-compatible HTTP + WebSocket API over the flow table.

``controller: {listen: 127.0.0.1:9090, secret: ..., ui: DIR}`` in the rules file starts it
on tunproxy's own event loop. Dashboards made for mihomo (zashboard, metacubexd, yacd)
and ``tunproxy top`` read it; ``views`` holds the JSON shapes, ``server`` the aiohttp app.
"""

from __future__ import annotations

from typing import Any

from tunproxy.errors import SetupError

__all__ = ["start_controller"]


async def start_controller(config: Any, proxy: Any) -> Any:
    """Start the API for a running ``tunproxy.app.Proxy``; SetupError if it cannot listen."""
    from tunproxy.controller.server import Controller

    def dns_is_fake(address: str) -> bool:
        dns = proxy.policy.dns if proxy.policy is not None else None
        return bool(dns is not None and dns.is_fake(address))

    controller = Controller(
        proxy.flow_log,
        secret=config.secret,
        ui=config.ui,
        ruleset=lambda: proxy.policy.ruleset,
        outbounds=lambda: proxy.policy.outbounds,
        config=lambda: proxy.config,
        is_fake=dns_is_fake,
        data_path=lambda: (getattr(proxy, "relay", None), getattr(proxy, "driver", None)),
    )
    try:
        await controller.start(config.host, config.port)
    except OSError as exc:
        await controller.aclose()
        raise SetupError(f"controller: cannot listen on {config.host}:{config.port}: "
                         f"{exc.strerror or exc}") from None
    return controller
