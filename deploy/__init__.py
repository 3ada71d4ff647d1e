"""The deploy stage: the AzureML entry script (score.py), the serving package phi3serve/ and the endpoint specs."""

# One name per module: this folder is linked into the package as phi3flow.deploy; imported by its bare folder name (from the
# repository root) every module in it would exist twice, with two sets of globals.
if __name__ != "phi3flow.deploy":
    raise ImportError(f"import phi3flow.deploy, not {__name__}")

# Nothing in this folder is imported through phi3flow.deploy: score.py is loaded by path (azmlinfsrv), phi3serve is a
# package of its own, and azureml/ holds specs. An empty path keeps package walkers (pf tool validate) out of it.
__path__: list[str] = []
