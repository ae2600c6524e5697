"""r1pipe: the DeepSeek-R1 recipe as software."""
__version__ = "0.1.0"
