"""Import-time stand-in for torchvision, for the ComfyUI host process only.

The ComfyUI snapshot imports torchvision at module level (comfy/sd.py via Stable Cascade, one upscaler),
but the ShotStream nodes never call it and there is no CPU torchvision build for torch 2.13 here. This stub
lets those imports succeed; anything that actually uses torchvision fails loudly. It is put on PYTHONPATH
by scripts/comfy_host.py for the host process only, never for the project's own code.
"""
__version__ = "0.0.0+shotstream-stub"



def _unavailable(name):
    def fail(*args, **kwargs):
        raise RuntimeError(
            f"torchvision.{name} is not available: this ComfyUI host runs with an import stub "
            "(scripts/host_stubs/torchvision); install a real torchvision to use nodes that need it"
        )

    fail.__name__ = name
    return fail


from . import models, transforms  # noqa: E402,F401  (after _unavailable: they use it)
