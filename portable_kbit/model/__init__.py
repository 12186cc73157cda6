"""Reading a model, never changing it: transformers/peft accessors, quantized weights, decoder layers, the trace."""
