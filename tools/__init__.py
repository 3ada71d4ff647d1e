"""The phi3flow Prompt Flow tool package (listed by `pf tool list` through the `package_tools` entry point)."""

# One name per module: this folder is linked into the package as phi3flow.tools; imported by its bare folder name (from the
# repository root) every module in it would exist twice, with two sets of globals.
if __name__ != "phi3flow.tools":
    raise ImportError(f"import phi3flow.tools, not {__name__}")
