/*
 * bitq-tvm kernel runner: calls one function of a TVM-compiled kernel library without a TVM
 * runtime, for targets that have none (riscv64) or where one is too heavy to emulate (aarch64).
 *
 *   runner LIB.so FUNC ARG...      ARG = in:DTYPE:SHAPE:FILE | out:DTYPE:SHAPE:FILE
 *
 * DTYPE is a numpy name (int8, uint8, int16, uint16, int32, uint32, int64, uint64, float16,
 * float32, float64, bool); SHAPE is comma-separated extents (empty for a 0-d tensor); FILE holds
 * the raw C-order bytes. Arguments are passed in command-line order; inputs are read before the
 * call, outputs (zero-initialised) are written after it. Exit status: 0 ok, 2 usage or I/O
 * error, 3 the kernel reported an error (its message is printed on stderr).
 *
 * The library's contract (docs/tvm-0.27-notes.md, "Running cross-compiled code"):
 * it imports TVMFFIErrorSetRaisedFromCStrParts (defined here, so link with -rdynamic), expects
 * the loader to fill the function-pointer globals __TVMBackendParallelLaunch,
 * __TVMBackendAllocWorkspace and __TVMBackendFreeWorkspace, and exports __tvm_ffi_FUNC with the
 * TVMFFISafeCallType ABI of tvm/ffi/c_api.h. Tensors are passed as kTVMFFIDLTensorPtr AnyViews.
 */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <tvm/ffi/c_api.h>

#define MAX_ARGS 64
#define MAX_DIMS 8
#define ALIGNMENT 64 /* TVM's kAllocAlignment: codegen may assume aligned data */

static char g_error[4096];

/* Called by the kernel on failure (bad argument shape/dtype, ...): keep the message. */
TVM_FFI_DLL void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** message_parts,
                                                   int32_t num_parts) {
  size_t used = (size_t)snprintf(g_error, sizeof(g_error), "%s: ", kind);
  for (int32_t i = 0; i < num_parts && used < sizeof(g_error); ++i) {
    used += (size_t)snprintf(g_error + used, sizeof(g_error) - used, "%s", message_parts[i]);
  }
}

typedef struct {
  void* sync_handle;
  int32_t num_task;
} ParallelGroupEnv;

typedef int (*ParallelLambda)(int task_id, ParallelGroupEnv* penv, void* cdata);

/* Runs the tasks one after another: emulation is single-threaded anyway. */
static int serial_parallel_launch(ParallelLambda flambda, void* cdata, int num_task) {
  ParallelGroupEnv env = {NULL, num_task > 0 ? num_task : 1};
  for (int task = 0; task < env.num_task; ++task) {
    int status = flambda(task, &env, cdata);
    if (status != 0) return status;
  }
  return 0;
}

static void* alloc_workspace(int device_type, int device_id, uint64_t nbytes, int dtype_code_hint,
                             int dtype_bits_hint) {
  (void)device_type, (void)device_id, (void)dtype_code_hint, (void)dtype_bits_hint;
  void* ptr = NULL;
  size_t rounded = (size_t)((nbytes + ALIGNMENT - 1) / ALIGNMENT * ALIGNMENT);
  return posix_memalign(&ptr, ALIGNMENT, rounded ? rounded : ALIGNMENT) == 0 ? ptr : NULL;
}

static int free_workspace(int device_type, int device_id, void* ptr) {
  (void)device_type, (void)device_id;
  free(ptr);
  return 0;
}

static int fail(const char* message, const char* detail) {
  fprintf(stderr, "runner: %s%s\n", message, detail ? detail : "");
  return 2;
}

static int parse_dtype(const char* name, DLDataType* dtype) {
  static const struct {
    const char* name;
    uint8_t code, bits;
  } table[] = {{"int8", kDLInt, 8},      {"int16", kDLInt, 16},     {"int32", kDLInt, 32},
               {"int64", kDLInt, 64},    {"uint8", kDLUInt, 8},     {"uint16", kDLUInt, 16},
               {"uint32", kDLUInt, 32},  {"uint64", kDLUInt, 64},   {"float16", kDLFloat, 16},
               {"float32", kDLFloat, 32}, {"float64", kDLFloat, 64}, {"bool", kDLBool, 8}};
  for (size_t i = 0; i < sizeof(table) / sizeof(table[0]); ++i) {
    if (strcmp(name, table[i].name) == 0) {
      dtype->code = table[i].code;
      dtype->bits = table[i].bits;
      dtype->lanes = 1;
      return 0;
    }
  }
  return -1;
}

typedef struct {
  int is_output;
  const char* path;
  DLTensor tensor;
  int64_t shape[MAX_DIMS];
  size_t nbytes;
} Argument;

/* Splits off the text up to the next ':' (replaced by '\0'); NULL if there is none. */
static char* next_field(char** cursor) {
  char* start = *cursor;
  char* colon = start ? strchr(start, ':') : NULL;
  if (!colon) return NULL;
  *colon = '\0';
  *cursor = colon + 1;
  return start;
}

/* Parses "in:DTYPE:SHAPE:FILE" in place (the string is modified); FILE may contain ':'. */
static int parse_argument(char* spec, Argument* arg) {
  char* cursor = spec;
  char* direction = next_field(&cursor);
  char* dtype = next_field(&cursor);
  char* shape = next_field(&cursor);
  if (!direction || !dtype || !shape || *cursor == '\0') return -1;
  arg->path = cursor;
  if (strcmp(direction, "in") == 0) {
    arg->is_output = 0;
  } else if (strcmp(direction, "out") == 0) {
    arg->is_output = 1;
  } else {
    return -1;
  }
  memset(&arg->tensor, 0, sizeof(arg->tensor));
  if (parse_dtype(dtype, &arg->tensor.dtype) != 0) return -1;
  int ndim = 0;
  size_t count = 1;
  for (char* dim = shape; *dim != '\0';) {
    char* end;
    long long extent = strtoll(dim, &end, 10);
    if (end == dim || extent < 0 || ndim == MAX_DIMS || (*end != ',' && *end != '\0')) return -1;
    arg->shape[ndim++] = extent;
    count *= (size_t)extent;
    dim = *end == ',' ? end + 1 : end;
  }
  arg->tensor.ndim = ndim;
  arg->tensor.shape = arg->shape;
  arg->tensor.strides = NULL; /* compact row-major */
  arg->tensor.byte_offset = 0;
  arg->tensor.device.device_type = kDLCPU;
  arg->tensor.device.device_id = 0;
  arg->nbytes = count * (arg->tensor.dtype.bits / 8);
  arg->tensor.data = alloc_workspace(kDLCPU, 0, arg->nbytes, 0, 0);
  if (!arg->tensor.data) return -1;
  memset(arg->tensor.data, 0, arg->nbytes);
  return 0;
}

static int read_input(const Argument* arg) {
  FILE* file = fopen(arg->path, "rb");
  if (!file) return fail("cannot open input ", arg->path);
  size_t got = fread(arg->tensor.data, 1, arg->nbytes, file);
  int extra = fgetc(file) != EOF;
  fclose(file);
  if (got != arg->nbytes || extra) return fail("input size does not match its shape: ", arg->path);
  return 0;
}

static int write_output(const Argument* arg) {
  FILE* file = fopen(arg->path, "wb");
  if (!file) return fail("cannot open output ", arg->path);
  size_t put = fwrite(arg->tensor.data, 1, arg->nbytes, file);
  fclose(file);
  return put == arg->nbytes ? 0 : fail("cannot write output ", arg->path);
}

/* Fills a loader-provided function-pointer global if the library has it. */
static void fill_slot(void* library, const char* name, void* function) {
  void** slot = (void**)dlsym(library, name);
  if (slot) *slot = function;
}

int main(int argc, char** argv) {
  if (argc < 3 || argc - 3 > MAX_ARGS) {
    return fail("usage: runner LIB.so FUNC [in|out:DTYPE:SHAPE:FILE]...", NULL);
  }
  void* library = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!library) return fail("dlopen failed: ", dlerror());
  /* Slots this runner cannot honour: fail loudly rather than crash in the kernel. */
  static const char* unsupported[] = {"__TVMBackendParallelBarrier", "__TVMFFIFunctionCall",
                                      "__TVMFFIEnvModLookupFromImports"};
  for (size_t i = 0; i < sizeof(unsupported) / sizeof(unsupported[0]); ++i) {
    if (dlsym(library, unsupported[i])) return fail("kernel needs unsupported ", unsupported[i]);
  }
  fill_slot(library, "__TVMBackendParallelLaunch", (void*)&serial_parallel_launch);
  fill_slot(library, "__TVMBackendAllocWorkspace", (void*)&alloc_workspace);
  fill_slot(library, "__TVMBackendFreeWorkspace", (void*)&free_workspace);

  char symbol[512];
  snprintf(symbol, sizeof(symbol), "__tvm_ffi_%s", argv[2]);
  TVMFFISafeCallType function = (TVMFFISafeCallType)dlsym(library, symbol);
  if (!function) return fail("function not found in library: ", symbol);

  static Argument args[MAX_ARGS];
  static TVMFFIAny packed[MAX_ARGS];
  int num_args = argc - 3;
  for (int i = 0; i < num_args; ++i) {
    if (parse_argument(argv[3 + i], &args[i]) != 0) return fail("bad argument: ", argv[3 + i]);
    if (!args[i].is_output && read_input(&args[i]) != 0) return 2;
    memset(&packed[i], 0, sizeof(packed[i]));
    packed[i].type_index = kTVMFFIDLTensorPtr;
    packed[i].v_ptr = &args[i].tensor;
  }
  TVMFFIAny result;
  memset(&result, 0, sizeof(result));
  result.type_index = kTVMFFINone;
  if (function(NULL, packed, num_args, &result) != 0) {
    fprintf(stderr, "runner: %s failed: %s\n", argv[2], g_error);
    return 3;
  }
  for (int i = 0; i < num_args; ++i) {
    if (args[i].is_output && write_output(&args[i]) != 0) return 2;
  }
  return 0;
}
