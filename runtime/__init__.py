"""wanflow runtime: the engine behind the nodes, CLI and server. Never imports ComfyUI."""
