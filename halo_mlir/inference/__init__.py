"""Running a compiled program: the runtime, generation and chat, perplexity."""
