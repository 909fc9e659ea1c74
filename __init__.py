"""wanflow: Wan2.1 / Wan2.2 video diffusion for ComfyUI and without it.

ComfyUI imports this folder as a custom-node package and reads the two mappings below.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = None
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
