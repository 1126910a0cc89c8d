"""The inference side: our vLLM server (server.py and the modules it lists), how to start it
(manager.py), and the trainer's one client of it (client.py)."""
