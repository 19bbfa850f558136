"""Inspect AI model provider ``steerlib/<model>``: :mod:`.registry` is the entry point Inspect loads,
:mod:`.provider` the model API it returns (imported only when a steerlib model is asked for)."""
