"""The HTTP face: the app factory and its routes (/hooks intake, /u unsubscribe, health)."""
