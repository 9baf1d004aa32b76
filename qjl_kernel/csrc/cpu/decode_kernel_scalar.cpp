// The fused CPU decode-attention task for any CPU: portable C++ (the compiler's baseline target).
#define QJL_ISA_LEVEL 0
#define QJL_TASK_NAME decode_task_scalar
#include "decode_kernel_impl.h"
