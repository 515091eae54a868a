"""/admin/: the web dashboard, a sub-application served beside /hooks (server-rendered, no script)."""

from .views import create

__all__ = ["create"]
