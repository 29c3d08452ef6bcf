"""TensorRT engines (thin; ``tensorrt`` and polygraphy's TensorRT loaders imported lazily)."""
