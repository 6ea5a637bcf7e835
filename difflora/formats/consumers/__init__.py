"""Will a LoRA file load completely in ComfyUI, A1111/Forge and diffusers? Each consumer's key rules.

`verdicts` asks every consumer (`comfyui`, `a1111`, `diffusers`, sharing `rules`) and formats the answers.
"""
