"""CUDA kernels for the RoI ops, and two ways to run them.

``kernels/*.cu``
    one file per op family (``roi_align``, ``roi_pool``, ``roi_warp``, ``spp``), forward
    and backward, ``extern "C"`` entry points per dtype.
``roilib.cuda.gpu``
    launches them with CuPy on the current stream (needs CuPy and a GPU).
``roilib.cuda.cpu``
    compiles the same text with the system C++ compiler and calls it through ctypes, so
    the kernels can be tested, and stepped through in a debugger, without a GPU.

Both expose the same functions as ``roilib.reference``. Neither is imported here:
importing ``roilib.cuda`` costs nothing and needs neither CuPy nor a compiler.
"""
