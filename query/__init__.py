"""The query side: request guard and error shape, API models, pricing."""
