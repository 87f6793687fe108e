// _dsgd_dispatch: run one op on the components of many DTensors on every local device, from C++.
//
// An eager step of the grouped kernel needs, per device, the local component of every
// gradient.  dtensor.unpack builds them one at a time: DTensor's Disassemble makes a new
// single-device TensorWithLayout per component (~2 us each), then Python wraps each in an
// EagerTensor, and the op call takes each back as an input (~1.3 us per input; 400
// gradients on 8 devices: ~15 ms in all).  The components already exist inside the DTensor
// (TensorWithLayoutTf holds one TFE_TensorHandle per local device), so this module borrows
// them, reads each one's buffer address and element count, and runs the kernels'
// by-address variants (DsgdMultiSgdAll, DsgdMultiSumSqAt) once for all local devices with
// one int64 tensor of those: no Python object, no copy and no op input per component.  The
// DTensors are referenced by the Components capsule, and each call is waited for, so every
// address stays valid while a kernel reads it.
//
// Only a dense TensorWithLayoutTf is read this way: each gradient's class is checked by its
// vtable against a dense DTensor made by the caller (init), its component count and every
// component's device against the devices given.  Anything else raises NotDense (Python then
// takes the dtensor.unpack path).  The one TensorFlow-internal entry point used is the
// exported TensorWithLayoutTf::get_tensor / num_tensors; dsgd.kernels builds this module per TensorFlow
// version and self-checks it against dtensor.unpack before use.
#include <Python.h>

#include <cstring>
#include <string>
#include <vector>

#include "tensorflow/c/eager/c_api.h"
#include "tensorflow/c/eager/c_api_experimental.h"
#include "tensorflow/c/tf_status.h"

// Exported by TensorFlow's Python bindings (lib_pywrap_tensorflow_common.so).
bool EagerTensor_CheckExact(const PyObject* o);
TFE_TensorHandle* EagerTensor_Handle(const PyObject* o);  // o must be an EagerTensor (unchecked)
PyObject* EagerTensorFromHandle(TFE_TensorHandle* handle, bool is_packed);

namespace tensorflow {
namespace dtensor {
// Declared with the exported member's signature (libtensorflow_cc.so); never constructed here.
class TensorWithLayoutTf {
 public:
  TFE_TensorHandle* get_tensor(size_t index) const;
  size_t num_tensors() const;
};
}  // namespace dtensor
}  // namespace tensorflow

namespace {

PyObject* NotDense = nullptr;  // exception type: this tensor cannot be read directly
const void* dense_vtable = nullptr;
std::string dtensor_device;

struct Status {
  TF_Status* s = TF_NewStatus();
  ~Status() { TF_DeleteStatus(s); }
  bool ok() const { return TF_GetCode(s) == TF_OK; }
};

TFE_Context* ContextOf(PyObject* capsule) {
  return static_cast<TFE_Context*>(PyCapsule_GetPointer(capsule, nullptr));
}

const void* VtableOf(TFE_TensorHandle* h, TF_Status* s) {
  void* obj = TFE_TensorHandleDevicePointer(h, s);
  if (TF_GetCode(s) != TF_OK || obj == nullptr) return nullptr;
  return *static_cast<const void* const*>(obj);
}

// init(reference): remember the DTensor device's name and the dense class's vtable.
PyObject* Init(PyObject*, PyObject* args) {
  PyObject* ref;
  if (!PyArg_ParseTuple(args, "O", &ref)) return nullptr;
  if (!EagerTensor_CheckExact(ref)) return PyErr_Format(PyExc_TypeError, "init() takes an EagerTensor");
  Status st;
  TFE_TensorHandle* h = EagerTensor_Handle(ref);
  const char* dev = TFE_TensorHandleDeviceName(h, st.s);
  if (!st.ok()) return PyErr_Format(PyExc_RuntimeError, "%s", TF_Message(st.s));
  const void* vt = VtableOf(h, st.s);
  if (!st.ok() || vt == nullptr) return PyErr_Format(PyExc_RuntimeError, "the reference is not a DTensor");
  dtensor_device = dev;
  dense_vtable = vt;
  Py_RETURN_NONE;
}

// The borrowed components of many DTensors: comps[i][k] is tensor i's handle on device k.
struct Components {
  std::vector<std::vector<TFE_TensorHandle*>> comps;
  std::vector<TF_DataType> dtypes;
  PyObject* owner;  // a tuple of the DTensors, which own the handles
};

void FreeComponents(PyObject* capsule) {
  auto* c = static_cast<Components*>(PyCapsule_GetPointer(capsule, "dsgd.Components"));
  if (c == nullptr) return;
  Py_XDECREF(c->owner);
  delete c;
}

// components(tensors, devices) -> capsule.  Raises NotDense if any tensor is not a dense
// DTensor whose components sit on `devices` in that order.
PyObject* GetComponents(PyObject*, PyObject* args) {
  PyObject *seq, *devs;
  if (!PyArg_ParseTuple(args, "OO", &seq, &devs)) return nullptr;
  if (dense_vtable == nullptr) return PyErr_Format(PyExc_RuntimeError, "init() was not called");
  PyObject* owner = PySequence_Tuple(seq);
  if (owner == nullptr) return nullptr;
  PyObject* dev_fast = PySequence_Fast(devs, "devices must be a sequence of strings");
  if (dev_fast == nullptr) {
    Py_DECREF(owner);
    return nullptr;
  }
  const Py_ssize_t nd = PySequence_Fast_GET_SIZE(dev_fast);
  std::vector<const char*> names(nd);
  for (Py_ssize_t k = 0; k < nd; ++k) {
    names[k] = PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(dev_fast, k));
    if (names[k] == nullptr) {
      Py_DECREF(dev_fast);
      Py_DECREF(owner);
      return nullptr;
    }
  }
  const Py_ssize_t n = PyTuple_GET_SIZE(owner);
  auto* c = new Components();
  c->owner = owner;
  c->comps.resize(n);
  c->dtypes.resize(n);
  Status st;
  const char* fault = nullptr;
  Py_ssize_t at = 0;
  for (Py_ssize_t i = 0; i < n && fault == nullptr; ++i) {
    at = i;
    PyObject* item = PyTuple_GET_ITEM(owner, i);
    TFE_TensorHandle* h = EagerTensor_CheckExact(item) ? EagerTensor_Handle(item) : nullptr;
    if (h == nullptr) { fault = "not an eager tensor"; break; }
    const char* dev = TFE_TensorHandleDeviceName(h, st.s);
    if (!st.ok() || dev == nullptr || dtensor_device != dev) { fault = "not on the DTensor device"; break; }
    void* obj = TFE_TensorHandleDevicePointer(h, st.s);
    if (!st.ok() || obj == nullptr || *static_cast<const void* const*>(obj) != dense_vtable) {
      fault = "not a dense DTensor";
      break;
    }
    auto* t = static_cast<const tensorflow::dtensor::TensorWithLayoutTf*>(obj);
    if (t->num_tensors() != static_cast<size_t>(nd)) {
      fault = "its number of components differs from the number of devices";
      break;
    }
    auto& row = c->comps[i];
    row.resize(nd);
    for (Py_ssize_t k = 0; k < nd; ++k) {
      TFE_TensorHandle* part = t->get_tensor(static_cast<size_t>(k));
      const char* pdev = part == nullptr ? nullptr : TFE_TensorHandleDeviceName(part, st.s);
      if (!st.ok() || pdev == nullptr || std::strcmp(pdev, names[k]) != 0) {
        fault = "a component is not on the expected device";
        break;
      }
      row[k] = part;
    }
    if (fault == nullptr) c->dtypes[i] = TFE_TensorHandleDataType(row[0]);
  }
  Py_DECREF(dev_fast);
  if (fault != nullptr) {
    Py_DECREF(owner);
    delete c;
    PyErr_Format(NotDense, "tensor %zd: %s", at, fault);
    return nullptr;
  }
  PyObject* cap = PyCapsule_New(c, "dsgd.Components", FreeComponents);
  if (cap == nullptr) {
    Py_DECREF(owner);
    delete c;
  }
  return cap;
}

bool HandlesOf(PyObject* seq, std::vector<TFE_TensorHandle*>* out) {
  PyObject* fast = PySequence_Fast(seq, "expected a sequence of eager tensors");
  if (fast == nullptr) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  out->clear();
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PySequence_Fast_GET_ITEM(fast, i);
    TFE_TensorHandle* h = EagerTensor_CheckExact(item) ? EagerTensor_Handle(item) : nullptr;
    if (h == nullptr) {
      Py_DECREF(fast);
      PyErr_SetString(PyExc_TypeError, "expected eager tensors");
      return false;
    }
    out->push_back(h);
  }
  Py_DECREF(fast);
  return true;
}

// Sets each (name, value) of a dict as an int, bool or type attribute.
bool SetAttrs(TFE_Op* op, PyObject* attrs, char kind) {
  if (attrs == Py_None) return true;
  PyObject *key, *value;
  Py_ssize_t pos = 0;
  while (PyDict_Next(attrs, &pos, &key, &value)) {
    const char* name = PyUnicode_AsUTF8(key);
    if (name == nullptr) return false;
    const long long v = PyLong_AsLongLong(value);
    if (v == -1 && PyErr_Occurred()) return false;
    if (kind == 'i') TFE_OpSetAttrInt(op, name, v);
    if (kind == 'b') TFE_OpSetAttrBool(op, name, v != 0);
    if (kind == 't') TFE_OpSetAttrType(op, name, static_cast<TF_DataType>(v));
  }
  return true;
}

// The address tensor of one device's call: n addresses, then n element counts.
TFE_TensorHandle* AddressTensor(const std::vector<TFE_TensorHandle*>& parts, TF_Status* s) {
  const int64_t n = static_cast<int64_t>(parts.size());
  const int64_t dims[1] = {2 * n};
  TF_Tensor* t = TF_AllocateTensor(TF_INT64, dims, 1, static_cast<size_t>(2 * n) * sizeof(int64_t));
  auto* v = static_cast<int64_t*>(TF_TensorData(t));
  for (int64_t i = 0; i < n && TF_GetCode(s) == TF_OK; ++i) {
    void* data = TFE_TensorHandleDevicePointer(parts[i], s);  // waits until the component is ready
    v[i] = static_cast<int64_t>(reinterpret_cast<intptr_t>(data));
    v[n + i] = TFE_TensorHandleNumElements(parts[i], s);
  }
  TFE_TensorHandle* h = TF_GetCode(s) == TF_OK ? TFE_NewTensorHandle(t, s) : nullptr;
  TF_DeleteTensor(t);  // the handle keeps its own reference
  return h;
}

// run_all(ctx, comps, select, op, device, before, after, ints, bools, types, outputs)
//   (positional; dsgd calls it through dsgd/kernels/dispatch.py's run_all, which names them)
//   One `op` (DsgdMultiSgdAll, DsgdMultiSumSqAt) on `device` for the components on every
//   device: inputs before + [addresses and counts of comps[i][k], device-major, for i in
//   select[k] (all when select is None)] + after; attribute T.  Returns the op's first
//   output (None when outputs == 0).  Finished when it returns.
PyObject* RunAll(PyObject*, PyObject* args) {
  PyObject *ctx_cap, *cap, *select, *before, *after, *ints, *bools, *types;
  const char *op_name, *device;
  int outputs;
  if (!PyArg_ParseTuple(args, "OOOssOOOOOi", &ctx_cap, &cap, &select, &op_name, &device, &before, &after, &ints,
                        &bools, &types, &outputs))
    return nullptr;
  TFE_Context* ctx = ContextOf(ctx_cap);
  auto* c = static_cast<Components*>(PyCapsule_GetPointer(cap, "dsgd.Components"));
  if (ctx == nullptr || c == nullptr) return nullptr;
  if (c->comps.empty()) return PyErr_Format(PyExc_ValueError, "no tensors");
  const Py_ssize_t n = static_cast<Py_ssize_t>(c->comps.size());
  const Py_ssize_t nd = static_cast<Py_ssize_t>(c->comps[0].size());
  std::vector<TFE_TensorHandle*> parts, pre, post;
  TF_DataType dtype = TF_FLOAT;
  bool first = true;
  for (Py_ssize_t k = 0; k < nd; ++k) {
    PyObject* sel = nullptr;
    if (select != Py_None) {
      PyObject* item = PySequence_GetItem(select, k);
      sel = item == nullptr ? nullptr : PySequence_Fast(item, "select[k] must be a sequence");
      Py_XDECREF(item);
      if (sel == nullptr) return nullptr;
    }
    const Py_ssize_t m = sel == nullptr ? n : PySequence_Fast_GET_SIZE(sel);
    for (Py_ssize_t j = 0; j < m; ++j) {
      const long i = sel == nullptr ? static_cast<long>(j) : PyLong_AsLong(PySequence_Fast_GET_ITEM(sel, j));
      if (i < 0 || i >= n) {
        Py_XDECREF(sel);
        if (!PyErr_Occurred()) PyErr_Format(PyExc_IndexError, "select[%zd] holds %ld, not in [0, %zd)", k, i, n);
        return nullptr;
      }
      if (first) dtype = c->dtypes[i];
      first = false;
      if (c->dtypes[i] != dtype) {
        Py_XDECREF(sel);
        return PyErr_Format(PyExc_TypeError, "tensor %ld has another dtype than the first", i);
      }
      parts.push_back(c->comps[i][k]);
    }
    Py_XDECREF(sel);
  }
  if (parts.empty()) Py_RETURN_NONE;
  if (!HandlesOf(before, &pre) || !HandlesOf(after, &post)) return nullptr;
  Status st;
  TFE_Executor* executor = TFE_ContextGetExecutorForThread(ctx);
  TFE_TensorHandle* addresses = AddressTensor(parts, st.s);
  TFE_Op* op = st.ok() ? TFE_NewOp(ctx, op_name, st.s) : nullptr;
  if (st.ok()) TFE_OpSetDevice(op, device, st.s);
  for (auto* h : pre) if (st.ok()) TFE_OpAddInput(op, h, st.s);
  if (st.ok()) TFE_OpAddInput(op, addresses, st.s);
  for (auto* h : post) if (st.ok()) TFE_OpAddInput(op, h, st.s);
  bool failed = false;
  if (st.ok()) {
    TFE_OpSetAttrType(op, "T", dtype);
    failed = !SetAttrs(op, ints, 'i') || !SetAttrs(op, bools, 'b') || !SetAttrs(op, types, 't');
  }
  TFE_TensorHandle* out = nullptr;
  if (st.ok() && !failed) {
    int num = outputs;
    TFE_Execute(op, &out, &num, st.s);
    if (num == 0) out = nullptr;
  }
  if (op != nullptr) TFE_DeleteOp(op);
  if (addresses != nullptr) TFE_DeleteTensorHandle(addresses);
  if (st.ok() && !failed && TFE_ExecutorIsAsync(executor)) TFE_ExecutorWaitForAllPendingNodes(executor, st.s);
  TFE_DeleteExecutor(executor);
  if (!st.ok() && !failed) {
    PyErr_Format(PyExc_RuntimeError, "%s on %s: %s", op_name, device, TF_Message(st.s));
    failed = true;
  }
  if (failed) {
    if (out != nullptr) TFE_DeleteTensorHandle(out);
    return nullptr;
  }
  if (out == nullptr) Py_RETURN_NONE;
  return EagerTensorFromHandle(out, false);
}

PyMethodDef kMethods[] = {
    {"init", Init, METH_VARARGS, "init(reference_dense_dtensor): the DTensor device and dense class to accept"},
    {"components", GetComponents, METH_VARARGS, "components(tensors, devices) -> capsule of borrowed handles"},
    {"run_all", RunAll, METH_VARARGS,
     "run_all(ctx, comps, select, op, device, before, after, ints, bools, types, outputs): one op for all devices"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_dsgd_dispatch", "dsgd's per-device op dispatch", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__dsgd_dispatch(void) {
  PyObject* m = PyModule_Create(&kModule);
  if (m == nullptr) return nullptr;
  NotDense = PyErr_NewException("_dsgd_dispatch.NotDense", PyExc_ValueError, nullptr);
  Py_INCREF(NotDense);
  PyModule_AddObject(m, "NotDense", NotDense);
  return m;
}
