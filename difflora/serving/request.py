"""The JSON body of POST /generate, checked by pydantic and turned into the GenerateConfig `difflora generate`
builds. Its own module so that the web UI's routes (difflora.webui) take it without importing the app."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from difflora.config.generate import GenerateConfig
from difflora.errors import ConfigError


class GenerateBody(BaseModel):
    """The JSON body of POST /generate; defaults are `difflora generate`'s."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, never silently ignored

    prompt: str
    negative_prompt: str = GenerateConfig.negative_prompt
    adapters: str = ""
    seed: int | None = None  # this and every range: GenerateConfig's (config.limits), the CLI's too
    steps: int = GenerateConfig.steps
    width: int | None = None
    height: int | None = None
    guidance: float = GenerateConfig.guidance
    scheduler: str = GenerateConfig.scheduler
    num_images: int = GenerateConfig.num_images
    format: Literal["png", "json"] = "png"

    def to_config(self) -> GenerateConfig:
        """The request as the GenerateConfig `difflora generate` would build (its validation included)."""
        if self.format == "png" and self.num_images > 1:
            raise ConfigError(
                f'format "png" answers with one image; ask for format "json" to get {self.num_images}.'
            )
        values = self.model_dump(exclude={"format", "adapters"})
        return GenerateConfig(**values, adapters=(self.adapters,) if self.adapters.strip() else ())
