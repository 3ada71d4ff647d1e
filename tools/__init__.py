"""The phi3flow Prompt Flow tool package (listed by `pf tool list` through the `package_tools` entry point)."""
