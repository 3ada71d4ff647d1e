"""phi3flow: chat with, fine-tune, deploy and evaluate Phi-3 endpoints from Prompt Flow."""

__version__ = "0.2.0"
