"""The server's settings, one documented field each (torch- and fastapi-free: `gptstack serve --help` reads
them without importing either), and the rule that keeps a server without a key off the network."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..config import opt
from ..errors import ConfigError


@dataclass
class ServeConfig:
    host: str = opt("127.0.0.1", "address to listen on; anything but loopback needs --api-key or --no-auth")
    port: int = opt(8000, "TCP port to listen on")
    api_key: str | None = opt(None, "require `Authorization: Bearer KEY` on /v1 (default: $GPTSTACK_API_KEY, "
                                    "else no key)")
    no_auth: bool = opt(False, "serve a non-loopback --host without a key (anyone who can reach it can use it)")
    max_batch: int = opt(8, "most requests in the running batch at once (each with its own parameters); the rest wait their turn")
    max_queue: int = opt(32, "most requests waiting or running; more are refused with 503 instead of waiting")
    model_name: str | None = opt(None, "the model id clients ask for (default: the run directory's name)")
    device: str = opt("auto", "where to run: auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps")
    max_body_bytes: int = opt(1 << 20, "largest request body; bigger ones get 413")
    max_n: int = opt(16, "most choices (n) per request")

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        for name in ("max_batch", "max_queue", "max_body_bytes", "max_n"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key is empty: give a key, or leave the flag out")
        if self.api_key and self.no_auth:
            raise ConfigError("--api-key and --no-auth contradict each other: give one")
        if not is_loopback(self.host) and not self.api_key and not self.no_auth:
            raise ConfigError(f"--host {self.host} would let anyone who can reach this machine use the model: "
                              "set --api-key KEY (or $GPTSTACK_API_KEY), or pass --no-auth to serve it open")

    def open_to_network(self) -> bool:
        return not is_loopback(self.host) and not self.api_key


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False   # a host name: it may resolve to anything
