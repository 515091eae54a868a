"""/admin/: the web dashboard, a sub-application served beside /hooks (server-rendered, no script)."""

from .views import create, error_page

__all__ = ["create", "error_page"]
