"""What a program costs: the compiled stream IR read (`cost`), the memory plan (`plan`), the step-time model."""
