"""``specdec loadtest``: load, faults and fuzz against a real server on loopback, bounded in time and count
(``cli`` runs them in order; ``load``, ``fuzz``, ``hostile`` and ``server_process`` work against any address)."""

from specdec.loadtest.cli import add_arguments, run, run_cli
from specdec.loadtest.fuzz import run_fuzz
from specdec.loadtest.hostile import run_hostile
from specdec.loadtest.load import PROMPTS, Reference, greedy_request, kill_clients, reference, run_load
from specdec.loadtest.server_process import health, rss_bytes, sigterm_under_load, spawn_server

__all__ = [
    "PROMPTS",
    "Reference",
    "add_arguments",
    "greedy_request",
    "health",
    "kill_clients",
    "reference",
    "rss_bytes",
    "run",
    "run_cli",
    "run_fuzz",
    "run_hostile",
    "run_load",
    "sigterm_under_load",
    "spawn_server",
]
