"""Live transcription: OpenAI Realtime API transcription sessions, transport-free (the WebSocket is in `api/realtime.py`)."""
