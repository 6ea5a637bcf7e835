"""The web UI of `difflora serve`: static pages under /ui (loaded without the token: they hold no data and
ask for it), their JSON API under /ui/api (token-protected like every other route)."""

from difflora.webui.routes import install_ui, public_path

__all__ = ["install_ui", "public_path"]
