"""The plugin's hooks into vLLM, one module per hook family (plugin.py's docstring lists them);
``vllm_fleet.plugin.register`` is the only entry point that installs them."""
