"""ComfyUI node classes; each declares a schema and calls the runtime."""
from ..runtime.schema import NodeRegistry
from .cache import CACHE_NODES
from .conditioning import CONDITIONING_NODES
from .image_to_video import IMAGE_TO_VIDEO_NODES
from .loaders import LOADER_NODES
from .lora import LORA_NODES
from .model_options import MODEL_OPTION_NODES
from .parallel import PARALLEL_NODES
from .sampler import SAMPLER_NODES
from .save import SAVE_NODES
from .standins import STANDIN_NODES
from .vae import VAE_NODES

NODE_CLASS_MAPPINGS: dict[str, type] = {
    **LOADER_NODES,
    **CONDITIONING_NODES,
    **SAMPLER_NODES,
    **VAE_NODES,
    **SAVE_NODES,
    **CACHE_NODES,
    **LORA_NODES,
    **PARALLEL_NODES,
    **MODEL_OPTION_NODES,
    **IMAGE_TO_VIDEO_NODES,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    name: cls.SCHEMA.display_name for name, cls in NODE_CLASS_MAPPINGS.items()
}


def node_registry() -> NodeRegistry:
    """Every node the headless executor and server know: wanflow's own plus stand-ins for the
    few ComfyUI core nodes common workflows use. The stand-ins are never exported to ComfyUI
    (NODE_CLASS_MAPPINGS), where the real core nodes exist."""
    classes = {**STANDIN_NODES, **NODE_CLASS_MAPPINGS}
    names = {name: cls.SCHEMA.display_name for name, cls in classes.items()}
    return NodeRegistry(classes=classes, display_names=names)
