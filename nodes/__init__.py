"""ComfyUI node classes; each declares a schema and calls the runtime."""
from .conditioning import CONDITIONING_NODES
from .loaders import LOADER_NODES
from .sampler import SAMPLER_NODES
from .vae import VAE_NODES

NODE_CLASS_MAPPINGS: dict[str, type] = {
    **LOADER_NODES,
    **CONDITIONING_NODES,
    **SAMPLER_NODES,
    **VAE_NODES,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    name: cls.SCHEMA.display_name for name, cls in NODE_CLASS_MAPPINGS.items()
}
