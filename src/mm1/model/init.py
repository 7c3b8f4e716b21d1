"""Starting values for a model built without memory: the meta-device build that sharded training uses.

A model too big for one device is built on the meta device (shapes only), sharded, given memory with
`to_empty`, and only then initialised, each rank its own shard, as torchtitan does. That last step has to
draw every parameter and recompute every derived buffer as the constructors do. PyTorch's convention
is a `reset_parameters()` on each module for the tensors it owns directly (`nn.Linear`, `nn.LayerNorm`,
... have one); every mm1 module that owns a parameter or buffer defines one too, and
`tests/test_init.py` holds every model variant to that, so a new parameter cannot be left as garbage.
"""

from __future__ import annotations

from torch import nn


def owns_tensors(module: nn.Module) -> bool:
    """Whether `module` holds a parameter or buffer itself (not only through its children)."""
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def reset_all(model: nn.Module) -> None:
    """Call every module's own `reset_parameters`, leaves first (a parent may re-draw a child's tensors)."""
    for module in reversed(list(model.modules())):
        reset = getattr(module, "reset_parameters", None)  # PyTorch's convention, not a capability sniff:
        if reset is not None:                                # tests/test_init.py requires it where tensors are
            reset()
        elif owns_tensors(module):
            raise TypeError(f"{type(module).__name__} owns parameters or buffers but has no reset_parameters(): "
                            f"a model built on the meta device would keep garbage there")
