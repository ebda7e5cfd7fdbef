//! Tensors: element types, the wire encoding, and dynamically typed arrays.
//!
//! On the wire a tensor is its dtype, its shape and its elements'
//! little-endian bytes in row-major (C) order. Encoding walks an ndarray in
//! logical order, so transposed, sliced and otherwise non-contiguous views are
//! sent as what they look like, not as their memory. Decoding is bit-exact:
//! NaN payloads of every float type and the sign of zero survive.

use std::borrow::Cow;
use std::fmt;

use half::{bf16, f16};
use ndarray::{Array, ArrayBase, ArrayD, ArrayView, Data, Dimension, IxDyn};

use crate::error::{Error, Result};
use crate::proto;

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// `f32`.
    F32,
    /// `f64`.
    F64,
    /// `i32`.
    I32,
    /// `i64`.
    I64,
    /// `u8`.
    U8,
    /// `u32`.
    U32,
    /// `u64`.
    U64,
    /// IEEE half precision, [`half::f16`].
    F16,
    /// bfloat16, [`half::bf16`].
    BF16,
    /// `i8`.
    I8,
    /// `i16`.
    I16,
    /// `u16`.
    U16,
    /// `bool`, one byte per element (0 or 1).
    Bool,
}

impl DType {
    /// Every dtype, in wire-enum order.
    pub const ALL: [DType; 13] = [
        DType::F32,
        DType::F64,
        DType::I32,
        DType::I64,
        DType::U8,
        DType::U32,
        DType::U64,
        DType::F16,
        DType::BF16,
        DType::I8,
        DType::I16,
        DType::U16,
        DType::Bool,
    ];

    /// Bytes per element.
    pub fn itemsize(self) -> usize {
        match self {
            DType::F64 | DType::I64 | DType::U64 => 8,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::U8 | DType::I8 | DType::Bool => 1,
        }
    }

    /// numpy's name for the dtype (`"float32"`, `"bfloat16"`, `"bool"`, ...),
    /// as the daemon's manifests spell it.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::U8 => "uint8",
            DType::U32 => "uint32",
            DType::U64 => "uint64",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I8 => "int8",
            DType::I16 => "int16",
            DType::U16 => "uint16",
            DType::Bool => "bool",
        }
    }

    /// The wire enum value.
    pub fn to_proto(self) -> proto::DType {
        match self {
            DType::F32 => proto::DType::Float32,
            DType::F64 => proto::DType::Float64,
            DType::I32 => proto::DType::Int32,
            DType::I64 => proto::DType::Int64,
            DType::U8 => proto::DType::Uint8,
            DType::U32 => proto::DType::Uint32,
            DType::U64 => proto::DType::Uint64,
            DType::F16 => proto::DType::Float16,
            DType::BF16 => proto::DType::Bfloat16,
            DType::I8 => proto::DType::Int8,
            DType::I16 => proto::DType::Int16,
            DType::U16 => proto::DType::Uint16,
            DType::Bool => proto::DType::Bool,
        }
    }

    /// From the wire enum value; `None` for `DTYPE_UNSPECIFIED` or unknown values.
    pub fn from_proto(v: i32) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.to_proto() as i32 == v)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A Rust element type the daemon stores: `f32 f64 i32 i64 u8 u32 u64`,
/// [`half::f16`], [`half::bf16`], `i8 i16 u16` and `bool`.
///
/// Sealed: the methods are the crate's encoding machinery.
pub trait Element: Copy + Send + Sync + fmt::Debug + 'static + sealed::Sealed {
    /// The dtype of this element type.
    const DTYPE: DType;
    /// Append this element's little-endian bytes.
    #[doc(hidden)]
    fn put_le(self, out: &mut Vec<u8>);
    /// Decode elements from little-endian bytes (`bytes.len()` is a multiple
    /// of the item size).
    #[doc(hidden)]
    fn decode_le(bytes: &[u8]) -> Vec<Self>;
    /// Wrap an array in the matching [`DynArray`] variant.
    #[doc(hidden)]
    fn wrap(a: ArrayD<Self>) -> DynArray;
    /// Borrow the array if `a` holds this element type.
    #[doc(hidden)]
    fn peek(a: &DynArray) -> Option<&ArrayD<Self>>;
    /// Take the array if `a` holds this element type.
    #[doc(hidden)]
    fn unwrap(a: DynArray) -> Result<ArrayD<Self>, DynArray>;
}

macro_rules! element {
    ($t:ty, $variant:ident, $n:literal, |$b:ident| $from:expr, |$x:ident| $to:expr) => {
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DType = DType::$variant;
            #[inline]
            fn put_le(self, out: &mut Vec<u8>) {
                let $x = self;
                out.extend_from_slice(&$to);
            }
            fn decode_le(bytes: &[u8]) -> Vec<Self> {
                bytes
                    .chunks_exact($n)
                    .map(|c| {
                        let $b: [u8; $n] = c.try_into().expect("chunks_exact");
                        $from
                    })
                    .collect()
            }
            fn wrap(a: ArrayD<Self>) -> DynArray {
                DynArray::$variant(a)
            }
            fn peek(a: &DynArray) -> Option<&ArrayD<Self>> {
                match a {
                    DynArray::$variant(x) => Some(x),
                    _ => None,
                }
            }
            fn unwrap(a: DynArray) -> Result<ArrayD<Self>, DynArray> {
                match a {
                    DynArray::$variant(x) => Ok(x),
                    other => Err(other),
                }
            }
        }
    };
    ($t:ty, $variant:ident, $n:literal) => {
        element!($t, $variant, $n, |b| <$t>::from_le_bytes(b), |x| x
            .to_le_bytes());
    };
}

element!(f32, F32, 4);
element!(f64, F64, 8);
element!(i32, I32, 4);
element!(i64, I64, 8);
element!(u8, U8, 1);
element!(u32, U32, 4);
element!(u64, U64, 8);
element!(f16, F16, 2);
element!(bf16, BF16, 2);
element!(i8, I8, 1);
element!(i16, I16, 2);
element!(u16, U16, 2);
// Any non-zero byte reads as `true`, as numpy does when viewing u8 as bool.
element!(bool, Bool, 1, |b| b[0] != 0, |x| [x as u8]);

/// An n-dimensional array of any supported element type.
#[derive(Clone, Debug, PartialEq)]
#[allow(missing_docs)] // the variants are named after their element types
pub enum DynArray {
    F32(ArrayD<f32>),
    F64(ArrayD<f64>),
    I32(ArrayD<i32>),
    I64(ArrayD<i64>),
    U8(ArrayD<u8>),
    U32(ArrayD<u32>),
    U64(ArrayD<u64>),
    F16(ArrayD<f16>),
    BF16(ArrayD<bf16>),
    I8(ArrayD<i8>),
    I16(ArrayD<i16>),
    U16(ArrayD<u16>),
    Bool(ArrayD<bool>),
}

macro_rules! each {
    ($v:expr, $a:ident => $e:expr) => {
        match $v {
            DynArray::F32($a) => $e,
            DynArray::F64($a) => $e,
            DynArray::I32($a) => $e,
            DynArray::I64($a) => $e,
            DynArray::U8($a) => $e,
            DynArray::U32($a) => $e,
            DynArray::U64($a) => $e,
            DynArray::F16($a) => $e,
            DynArray::BF16($a) => $e,
            DynArray::I8($a) => $e,
            DynArray::I16($a) => $e,
            DynArray::U16($a) => $e,
            DynArray::Bool($a) => $e,
        }
    };
}

/// Evaluate `$e` with `$t` the element type of the dtype `$d`.
macro_rules! with_type {
    ($d:expr, $t:ident => $e:expr) => {
        match $d {
            DType::F32 => {
                type $t = f32;
                $e
            }
            DType::F64 => {
                type $t = f64;
                $e
            }
            DType::I32 => {
                type $t = i32;
                $e
            }
            DType::I64 => {
                type $t = i64;
                $e
            }
            DType::U8 => {
                type $t = u8;
                $e
            }
            DType::U32 => {
                type $t = u32;
                $e
            }
            DType::U64 => {
                type $t = u64;
                $e
            }
            DType::F16 => {
                type $t = f16;
                $e
            }
            DType::BF16 => {
                type $t = bf16;
                $e
            }
            DType::I8 => {
                type $t = i8;
                $e
            }
            DType::I16 => {
                type $t = i16;
                $e
            }
            DType::U16 => {
                type $t = u16;
                $e
            }
            DType::Bool => {
                type $t = bool;
                $e
            }
        }
    };
}

fn decode<T: Element>(shape: &[usize], bytes: &[u8]) -> Result<DynArray> {
    let a = ArrayD::from_shape_vec(IxDyn(shape), decode_vec::<T>(bytes))
        .map_err(|e| Error::Tensor(format!("shape {shape:?}: {e}")))?;
    Ok(T::wrap(a))
}

/// Elements from little-endian bytes (`bytes.len()` a multiple of the item
/// size): one `memcpy` on a little-endian target, where the bytes already are
/// the elements' memory; element by element otherwise, and always for bool
/// (any non-zero byte reads as `true`, and a bool whose byte is not 0 or 1
/// would be undefined behaviour).
fn decode_vec<T: Element>(bytes: &[u8]) -> Vec<T> {
    if cfg!(target_endian = "big") || T::DTYPE == DType::Bool {
        return T::decode_le(bytes);
    }
    let size = std::mem::size_of::<T>();
    debug_assert_eq!(size, T::DTYPE.itemsize());
    debug_assert_eq!(bytes.len() % size, 0);
    let n = bytes.len() / size;
    let mut v = Vec::<T>::with_capacity(n);
    // SAFETY: every `Element` but bool (excluded above) is a plain integer
    // or float type for which any bit pattern is a valid value; the vector
    // has room for `n` elements, exactly `bytes.len()` bytes, which are
    // initialised by the copy before `set_len`.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr().cast::<u8>(), n * size);
        v.set_len(n);
    }
    v
}

/// A standard-layout array of `dtype` and `shape` being filled with its
/// little-endian bytes — copied from chunks or read straight from a file —
/// in memory that is never zeroed first. Zeroing is not free: `calloc` of
/// heap memory a previous frame freed writes every byte (2 ms per 16 MB
/// tensor, on the read's critical path), and fresh zero pages are faulted
/// in by the read anyway. It becomes a [`DynArray`] only once every byte has
/// been written ([`finish`](Self::finish)); dropped before, it is freed
/// unread.
pub(crate) struct Filling {
    /// From the global allocator with `layout` (dangling if it has size 0).
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
    dtype: DType,
    shape: Vec<usize>,
    n: usize,
    /// Bytes `..filled` are initialised.
    filled: usize,
}

// SAFETY: `Filling` owns its allocation exclusively (like a `Vec<u8>`).
unsafe impl Send for Filling {}

impl Filling {
    /// `Ok(None)` where the elements' memory is not their wire bytes: bool
    /// (not every byte is a bool) and big-endian targets.
    pub(crate) fn new(dtype: DType, shape: &[usize]) -> Result<Option<Filling>> {
        if cfg!(target_endian = "big") || dtype == DType::Bool {
            return Ok(None);
        }
        let n = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| Error::Tensor(format!("shape {shape:?} overflows")))?;
        let layout = with_type!(dtype, T => std::alloc::Layout::array::<T>(n))
            .map_err(|_| Error::Tensor(format!("{n} {dtype} elements do not fit in memory")))?;
        let bytes = layout.size();
        let ptr = if bytes == 0 {
            std::ptr::NonNull::<u8>::dangling()
        } else {
            // SAFETY: the layout has a non-zero size.
            std::ptr::NonNull::new(unsafe { std::alloc::alloc(layout) }).ok_or_else(|| {
                Error::Tensor(format!(
                    "cannot allocate {bytes} bytes for a {dtype} tensor"
                ))
            })?
        };
        Ok(Some(Filling {
            ptr,
            layout,
            dtype,
            shape: shape.to_vec(),
            n,
            filled: 0,
        }))
    }

    /// Bytes written so far.
    pub(crate) fn filled(&self) -> usize {
        self.filled
    }

    /// The bytes not yet written, to be read into.
    pub(crate) fn rest(&mut self) -> &mut [std::mem::MaybeUninit<u8>] {
        // SAFETY: the allocation holds `layout.size()` bytes, this borrows
        // `self` mutably, and `MaybeUninit` asks nothing of their contents.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.ptr.as_ptr().add(self.filled).cast(),
                self.layout.size() - self.filled,
            )
        }
    }

    /// Record that the first `n` bytes of [`rest`](Self::rest) were written.
    ///
    /// # Safety
    /// They were: every one of them initialised.
    pub(crate) unsafe fn advance(&mut self, n: usize) {
        assert!(n <= self.layout.size() - self.filled, "past the end");
        self.filled += n;
    }

    /// Append `data` (the caller checked that it fits).
    pub(crate) fn push(&mut self, data: &[u8]) {
        let rest = self.rest();
        assert!(data.len() <= rest.len(), "past the end");
        // SAFETY: `rest` has room for `data`, which it cannot overlap (it is
        // borrowed from `self`); the copy initialises those bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), rest.as_mut_ptr().cast(), data.len());
            self.advance(data.len());
        }
    }

    /// The array, once every byte has been written; `None` before.
    pub(crate) fn finish(self) -> Option<DynArray> {
        if self.filled != self.layout.size() {
            return None;
        }
        let this = std::mem::ManuallyDrop::new(self);
        fn array<T: Element>(f: &Filling) -> DynArray {
            assert_ne!(T::DTYPE, DType::Bool, "Filling::new refuses bool");
            let v = if f.layout.size() == 0 {
                Vec::new()
            } else {
                // SAFETY: the allocation was made by the global allocator
                // with `Layout::array::<T>(n)` (`new`, for this dtype's `T`),
                // every byte is initialised, and every bit pattern is a
                // valid `T` for these plain integer and float types. The
                // `Filling` is not dropped: its memory now belongs to the
                // vector.
                unsafe { Vec::from_raw_parts(f.ptr.as_ptr().cast::<T>(), f.n, f.n) }
            };
            let a = ArrayD::from_shape_vec(IxDyn(&f.shape), v).expect("n is the shape's product");
            T::wrap(a)
        }
        Some(with_type!(this.dtype, T => array::<T>(&this)))
    }
}

impl Drop for Filling {
    fn drop(&mut self) {
        if self.layout.size() > 0 {
            // SAFETY: allocated in `new` with this layout, not handed on
            // (`finish` does not drop).
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
        }
    }
}

/// The little-endian bytes of a standard-layout array's elements, writable:
/// on a little-endian target they are the elements' own memory. `None` for
/// bool (not every byte is a valid bool), on big-endian targets, and for an
/// array that is not contiguous in standard order.
fn le_bytes_mut<T: Element>(a: &mut ArrayD<T>) -> Option<&mut [u8]> {
    if cfg!(target_endian = "big") || T::DTYPE == DType::Bool {
        return None;
    }
    let s = a.as_slice_mut()?;
    let len = std::mem::size_of_val(s);
    // SAFETY: every `Element` but bool (excluded above) is a plain integer or
    // float type without padding for which any bit pattern is a valid value,
    // so its memory may be viewed, and written, as `len` initialised bytes;
    // the view borrows `a` mutably for its lifetime.
    Some(unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u8>(), len) })
}

impl DynArray {
    /// The elements' memory as their little-endian (wire) bytes, writable,
    /// when that is the same memory: a little-endian target, a dtype other
    /// than bool, an array contiguous in standard order. `None` otherwise
    /// (decode with [`from_le_bytes`](Self::from_le_bytes) then).
    pub fn le_bytes_mut(&mut self) -> Option<&mut [u8]> {
        each!(self, a => le_bytes_mut(a))
    }
}

impl DynArray {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            DynArray::F32(_) => DType::F32,
            DynArray::F64(_) => DType::F64,
            DynArray::I32(_) => DType::I32,
            DynArray::I64(_) => DType::I64,
            DynArray::U8(_) => DType::U8,
            DynArray::U32(_) => DType::U32,
            DynArray::U64(_) => DType::U64,
            DynArray::F16(_) => DType::F16,
            DynArray::BF16(_) => DType::BF16,
            DynArray::I8(_) => DType::I8,
            DynArray::I16(_) => DType::I16,
            DynArray::U16(_) => DType::U16,
            DynArray::Bool(_) => DType::Bool,
        }
    }

    /// The dimensions (empty for a 0-d scalar).
    pub fn shape(&self) -> &[usize] {
        each!(self, a => a.shape())
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        each!(self, a => a.len())
    }

    /// True when the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The array as `ArrayD<T>`, if it holds `T`.
    pub fn as_array<T: Element>(&self) -> Option<&ArrayD<T>> {
        T::peek(self)
    }

    /// The array as `ArrayD<T>`; `Err` gives `self` back when it holds another
    /// element type.
    pub fn into_array<T: Element>(self) -> Result<ArrayD<T>, DynArray> {
        T::unwrap(self)
    }

    /// The array as `ArrayD<T>`, or [`Error::Tensor`] naming both dtypes.
    pub fn try_into_array<T: Element>(self) -> Result<ArrayD<T>> {
        T::unwrap(self)
            .map_err(|a| Error::Tensor(format!("the tensor is {}, not {}", a.dtype(), T::DTYPE)))
    }

    /// Elements' little-endian bytes in row-major order (the wire encoding).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        each!(self, a => encode(a))
    }

    /// Decode the wire encoding: `bytes.len()` must be the product of `shape`
    /// times the dtype's item size.
    pub fn from_le_bytes(dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<DynArray> {
        let want = shape
            .iter()
            .try_fold(dtype.itemsize(), |n, &d| n.checked_mul(d));
        if want != Some(bytes.len()) {
            return Err(Error::Tensor(format!(
                "{} bytes do not make a {dtype} tensor of shape {shape:?}",
                bytes.len()
            )));
        }
        with_type!(dtype, T => decode::<T>(shape, bytes))
    }
}

impl fmt::Display for DynArray {
    /// ndarray's formatting of the values (`{:.3}` and friends apply).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        each!(self, a => fmt::Display::fmt(a, f))
    }
}

impl<T: Element> From<ArrayD<T>> for DynArray {
    fn from(a: ArrayD<T>) -> DynArray {
        T::wrap(a)
    }
}

/// The wire encoding of a row-major contiguous slice, without a copy: on a
/// little-endian target every [`Element`]'s memory is its little-endian
/// encoding. `None` on a big-endian target.
fn le_bytes<T: Element>(s: &[T]) -> Option<&[u8]> {
    if cfg!(target_endian = "little") {
        // SAFETY: `Element` is sealed to primitive integers and floats,
        // `half`'s f16/bf16 (`repr(transparent)` over u16) and bool: no
        // padding and every byte initialised; a bool's byte is 0 or 1, which
        // is its encoding. u8 needs no alignment, and the length is the
        // slice's size in bytes.
        Some(unsafe {
            std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s))
        })
    } else {
        None
    }
}

fn encode<S, D, T>(a: &ArrayBase<S, D>) -> Vec<u8>
where
    S: Data<Elem = T>,
    D: Dimension,
    T: Element,
{
    if let Some(b) = a.as_slice().and_then(le_bytes) {
        return b.to_vec();
    }
    let mut out = Vec::with_capacity(a.len() * T::DTYPE.itemsize());
    // `iter` visits elements in logical row-major order whatever the strides.
    a.iter().for_each(|x| x.put_le(&mut out));
    out
}

/// A tensor encoded for sending: dtype, shape and row-major little-endian
/// bytes. Make one from any ndarray array or view (`TensorData::from(&a)`,
/// `a.view().into()`) or from a [`DynArray`].
///
/// From a borrowed array in row-major (C) order it borrows the array's memory
/// (on a little-endian machine, where that memory is already the encoding),
/// so writing it costs one copy: into shared memory or into the gRPC
/// messages. Other layouts, and owned arrays, are encoded into a buffer of
/// its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorData<'a> {
    dtype: DType,
    shape: Vec<u64>,
    bytes: Cow<'a, [u8]>,
}

impl<'a> TensorData<'a> {
    /// From already encoded bytes (a `Vec<u8>` or a `&[u8]`); fails unless
    /// `bytes.len()` is the product of `shape` times the dtype's item size.
    pub fn new(
        dtype: DType,
        shape: Vec<u64>,
        bytes: impl Into<Cow<'a, [u8]>>,
    ) -> Result<TensorData<'a>> {
        let bytes = bytes.into();
        let want = shape
            .iter()
            .try_fold(dtype.itemsize() as u64, |n, &d| n.checked_mul(d));
        if want != Some(bytes.len() as u64) {
            return Err(Error::Tensor(format!(
                "{} bytes do not make a {dtype} tensor of shape {shape:?}",
                bytes.len()
            )));
        }
        Ok(TensorData {
            dtype,
            shape,
            bytes,
        })
    }

    /// Encode an ndarray array or view of any dimensionality and layout
    /// (borrowing its memory when it is row-major contiguous).
    pub fn from_array<S, D, T>(a: &'a ArrayBase<S, D>) -> TensorData<'a>
    where
        S: Data<Elem = T>,
        D: Dimension,
        T: Element,
    {
        let bytes = match a.as_slice().and_then(le_bytes) {
            Some(b) => Cow::Borrowed(b),
            None => Cow::Owned(encode(a)),
        };
        TensorData {
            dtype: T::DTYPE,
            shape: a.shape().iter().map(|&d| d as u64).collect(),
            bytes,
        }
    }

    /// A copy that owns its bytes, to keep beyond the array's lifetime.
    pub fn into_owned(self) -> TensorData<'static> {
        TensorData {
            dtype: self.dtype,
            shape: self.shape,
            bytes: Cow::Owned(self.bytes.into_owned()),
        }
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The dimensions (empty for a 0-d scalar).
    pub fn shape(&self) -> &[u64] {
        &self.shape
    }

    /// The encoded bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Decode back into an array.
    pub fn to_array(&self) -> Result<DynArray> {
        let shape: Vec<usize> = self.shape.iter().map(|&d| d as usize).collect();
        DynArray::from_le_bytes(self.dtype, &shape, &self.bytes)
    }

    pub(crate) fn into_parts(self) -> (DType, Vec<u64>, Cow<'a, [u8]>) {
        (self.dtype, self.shape, self.bytes)
    }
}

impl<'a, S, D, T> From<&'a ArrayBase<S, D>> for TensorData<'a>
where
    S: Data<Elem = T>,
    D: Dimension,
    T: Element,
{
    fn from(a: &'a ArrayBase<S, D>) -> TensorData<'a> {
        TensorData::from_array(a)
    }
}

impl<'a, T: Element, D: Dimension> From<ArrayView<'a, T, D>> for TensorData<'a> {
    fn from(a: ArrayView<'a, T, D>) -> TensorData<'a> {
        match a.to_slice().and_then(le_bytes) {
            // Borrows what the view borrows, not the view itself.
            Some(b) => TensorData {
                dtype: T::DTYPE,
                shape: a.shape().iter().map(|&d| d as u64).collect(),
                bytes: Cow::Borrowed(b),
            },
            None => TensorData::from_array(&a).into_owned(),
        }
    }
}

impl<T: Element, D: Dimension> From<Array<T, D>> for TensorData<'static> {
    fn from(a: Array<T, D>) -> TensorData<'static> {
        TensorData::from_array(&a).into_owned()
    }
}

impl<'a> From<&'a DynArray> for TensorData<'a> {
    fn from(a: &'a DynArray) -> TensorData<'a> {
        each!(a, x => TensorData::from_array(x))
    }
}

impl From<DynArray> for TensorData<'static> {
    fn from(a: DynArray) -> TensorData<'static> {
        TensorData::from(&a).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr2, s, Array3};

    #[test]
    fn strided_views_encode_in_logical_order() {
        let a = arr2(&[[1i16, 2, 3], [4, 5, 6]]);
        let t = TensorData::from(a.t());
        assert_eq!(t.shape(), &[3, 2]);
        let back = t.to_array().unwrap().into_array::<i16>().unwrap();
        assert_eq!(back, a.t().to_owned().into_dyn());
        let b = Array3::<u16>::from_shape_fn((3, 4, 5), |(i, j, k)| (i * 100 + j * 10 + k) as u16);
        let v = b.slice(s![..;2, 1.., ..;-2]);
        let t = TensorData::from(v);
        let back = t.to_array().unwrap().into_array::<u16>().unwrap();
        assert_eq!(back, v.to_owned().into_dyn());
    }

    #[test]
    fn contiguous_arrays_are_borrowed_and_others_encoded() {
        let a = Array3::<f32>::from_shape_fn((2, 3, 4), |(i, j, k)| (i * 12 + j * 4 + k) as f32);
        let expect: Vec<u8> = a.iter().flat_map(|x| x.to_le_bytes()).collect();
        let t = TensorData::from(&a);
        assert!(matches!(t.bytes, Cow::Borrowed(_)) == cfg!(target_endian = "little"));
        assert_eq!(t.bytes(), expect);
        let t = TensorData::from(a.view());
        assert!(matches!(t.bytes, Cow::Borrowed(_)) == cfg!(target_endian = "little"));
        assert_eq!(t.bytes(), expect);
        // A transposed view is not row-major: encoded in logical order.
        let t = TensorData::from(a.t());
        assert!(matches!(t.bytes, Cow::Owned(_)));
        let back = t.to_array().unwrap().into_array::<f32>().unwrap();
        assert_eq!(back, a.t().to_owned().into_dyn());
        // Owned arrays and into_owned copy.
        let t = TensorData::from(a.clone()).into_owned();
        assert_eq!(t.bytes(), expect);
        let b = ndarray::Array1::from(vec![true, false, true]);
        assert_eq!(TensorData::from(&b).bytes(), [1, 0, 1]);
    }

    #[test]
    fn decoding_copies_bytes_and_reads_any_nonzero_byte_as_true() {
        let vals = [1.5f64, -0.0, f64::from_bits(0x7ff8_dead_beef_0001)];
        let bytes: Vec<u8> = vals.iter().flat_map(|x| x.to_le_bytes()).collect();
        let got: Vec<f64> = decode_vec(&bytes);
        assert!(got
            .iter()
            .zip(&vals)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        let u: Vec<u16> = decode_vec(&[1, 2, 0xff, 0xfe]);
        assert_eq!(u, [0x0201, 0xfeff]);
        let b: Vec<bool> = decode_vec(&[0, 1, 2, 255]);
        assert_eq!(b, [false, true, true, true]);
    }

    #[test]
    fn a_filling_equals_the_decoded_array_once_every_byte_is_written() {
        let shape = [3usize, 5];
        for dtype in DType::ALL {
            let bytes: Vec<u8> = (0..15 * dtype.itemsize())
                .map(|i| (i * 37 + 11) as u8)
                .collect();
            let want = DynArray::from_le_bytes(dtype, &shape, &bytes).unwrap();
            let Some(mut f) = Filling::new(dtype, &shape).unwrap() else {
                // Not every byte is a bool: decoded instead, never filled.
                assert_eq!(dtype, DType::Bool);
                continue;
            };
            assert_eq!(f.rest().len(), bytes.len(), "{dtype}");
            // In pieces, as chunks arrive.
            let (a, b) = bytes.split_at(7);
            f.push(a);
            assert_eq!(f.filled(), 7);
            f.push(b);
            let got = f.finish().expect("every byte written");
            assert_eq!(got.dtype(), dtype);
            assert_eq!(got.shape(), &shape[..]);
            // Compared as bytes: some patterns are NaNs.
            assert_eq!(got.to_le_bytes(), want.to_le_bytes(), "{dtype}");
            assert_eq!(got.to_le_bytes(), bytes, "{dtype}");
        }
        // Short of its size it is no array (and is freed unread).
        let mut f = Filling::new(DType::F64, &[2, 2]).unwrap().unwrap();
        f.push(&[1; 31]);
        assert!(f.finish().is_none());
        let empty = Filling::new(DType::F32, &[0, 7]).unwrap().unwrap();
        assert_eq!(empty.finish().unwrap().shape(), &[0, 7]);
        assert!(Filling::new(DType::F64, &[usize::MAX, 2]).is_err());
        assert!(Filling::new(DType::F64, &[usize::MAX / 4, 2]).is_err());
    }

    #[test]
    fn floats_are_bit_exact() {
        let f = [0x7e01u16, 0xfc00, 0x8000, 0x0001, 0xffff];
        let a = ndarray::Array1::from_iter(f.iter().map(|&b| f16::from_bits(b)));
        let d = TensorData::from(&a).to_array().unwrap();
        let got: Vec<u16> = d
            .as_array::<f16>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect();
        assert_eq!(got, f);
        assert!(d.as_array::<bf16>().is_none());
    }

    #[test]
    fn sizes_are_checked() {
        assert!(TensorData::new(DType::F32, vec![2, 2], vec![0; 15]).is_err());
        assert!(TensorData::new(DType::F32, vec![], vec![0; 4]).is_ok());
        assert!(TensorData::new(DType::U64, vec![u64::MAX, 2], vec![]).is_err());
        assert!(DynArray::from_le_bytes(DType::Bool, &[0, 5], &[])
            .unwrap()
            .is_empty());
        for d in DType::ALL {
            assert_eq!(DType::from_proto(d.to_proto() as i32), Some(d));
        }
        assert_eq!(DType::from_proto(0), None);
    }
}
