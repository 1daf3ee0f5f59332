//! Numbers as little-endian bytes for the byte collectives ([`super::Comm::all_gather_bytes`],
//! [`super::Comm::all_to_all_bytes`]): one encoding, and one copy, for every type the ranks
//! exchange (gradients, parameters, expert rows, counts).

// Every supported target is little-endian, so a number's bytes in memory are its encoding.
const _: () = assert!(cfg!(target_endian = "little"), "the rank exchange assumes a little-endian target");

/// A plain number: no padding, and every bit pattern of its size is a valid value.
pub trait Le: Copy + Default {}

impl Le for f32 {}
impl Le for f64 {}
impl Le for u32 {}
impl Le for u64 {}

/// The bytes of `v`, without a copy.
pub fn as_bytes<T: Le>(v: &[T]) -> &[u8] {
    // SAFETY: T is a plain number (no padding), and any byte is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// `v` as bytes.
pub fn to_bytes<T: Le>(v: &[T]) -> Vec<u8> {
    as_bytes(v).to_vec()
}

/// The numbers in `b` (a trailing partial number is dropped; callers check the length first).
pub fn from_bytes<T: Le>(b: &[u8]) -> Vec<T> {
    let mut out = vec![T::default(); b.len() / std::mem::size_of::<T>()];
    // SAFETY: the destination holds exactly that many whole numbers' bytes, the source is read
    // bytewise (no alignment needed), and any bit pattern is a valid T.
    unsafe {
        std::ptr::copy_nonoverlapping(b.as_ptr(), out.as_mut_ptr() as *mut u8, std::mem::size_of_val(out.as_slice()))
    };
    out
}

/// One number from the first bytes of `b`, None when `b` is too short.
pub fn read<T: Le>(b: &[u8]) -> Option<T> {
    let b = b.get(..std::mem::size_of::<T>())?;
    // SAFETY: b holds the size of T, read without alignment; any bit pattern is a valid T.
    Some(unsafe { std::ptr::read_unaligned(b.as_ptr() as *const T) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_comes_back_as_it_went() {
        let f = [1.5f32, -0.0, f32::MIN_POSITIVE, f32::NAN];
        let back = from_bytes::<f32>(&to_bytes(&f));
        assert_eq!(
            back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            f.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(from_bytes::<f64>(&to_bytes(&[1e300, -2.5])), vec![1e300, -2.5]);
        assert_eq!(from_bytes::<u32>(&to_bytes(&[7u32, u32::MAX])), vec![7, u32::MAX]);
        assert_eq!(from_bytes::<u64>(&to_bytes(&[1u64 << 40])), vec![1u64 << 40]);
        assert_eq!(to_bytes(&[1u32, 2]), vec![1, 0, 0, 0, 2, 0, 0, 0], "little-endian");
        // Unaligned sources, trailing partial numbers, short reads.
        let b = to_bytes(&[3.25f64, 4.5]);
        let mut shifted = vec![9u8];
        shifted.extend(&b);
        shifted.push(1);
        assert_eq!(from_bytes::<f64>(&shifted[1..]), vec![3.25, 4.5]);
        assert_eq!(read::<f64>(&b[8..]), Some(4.5));
        assert_eq!(read::<u64>(&b[..7]), None);
    }
}
