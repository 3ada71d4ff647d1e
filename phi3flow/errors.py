"""The one base class of the errors phi3flow reports to its user.

Library code raises these (never SystemExit); `phi3flow` (cli.main) catches them once, prints
`phi3flow <command>: <message>` without a traceback and exits 1. The scoring script keeps its own
`phi3serve.contract.ServingError`: it runs in Azure without phi3flow.
"""

from __future__ import annotations


class Phi3flowError(Exception):
    """An error with a message a user can act on."""
