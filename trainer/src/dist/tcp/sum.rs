//! Element-wise sums on the little-endian bytes of a tensor chunk: the ring adds what arrives
//! from its predecessor to its own part without building a tensor per segment.
use tch::Kind;

/// `acc[i] = acc[i] + own[i]` over elements of one dtype (integers wrap, as torch's do).
pub(super) type AddFn = fn(&mut [u8], &[u8]);

macro_rules! adder {
    ($name:ident, $t:ty, $add:expr) => {
        fn $name(acc: &mut [u8], own: &[u8]) {
            const N: usize = std::mem::size_of::<$t>();
            for (a, b) in acc.chunks_exact_mut(N).zip(own.chunks_exact(N)) {
                let x = <$t>::from_le_bytes(a.try_into().expect("element"));
                let y = <$t>::from_le_bytes(b.try_into().expect("element"));
                let add: fn($t, $t) -> $t = $add;
                a.copy_from_slice(&add(x, y).to_le_bytes());
            }
        }
    };
}

adder!(add_f32, f32, |x, y| x + y);
adder!(add_f64, f64, |x, y| x + y);
adder!(add_f16, half::f16, |x, y| x + y);
adder!(add_bf16, half::bf16, |x, y| x + y);
adder!(add_i64, i64, i64::wrapping_add);
adder!(add_i32, i32, i32::wrapping_add);
adder!(add_i16, i16, i16::wrapping_add);
adder!(add_i8, i8, i8::wrapping_add);
adder!(add_u8, u8, u8::wrapping_add);

/// The sum for `kind`; `None` for a dtype the wire format does not carry.
pub(super) fn adder_for(kind: Kind) -> Option<AddFn> {
    Some(match kind {
        Kind::Float => add_f32,
        Kind::Double => add_f64,
        Kind::Half => add_f16,
        Kind::BFloat16 => add_bf16,
        Kind::Int64 => add_i64,
        Kind::Int => add_i32,
        Kind::Int16 => add_i16,
        Kind::Int8 => add_i8,
        Kind::Uint8 => add_u8,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    fn bytes(t: &Tensor) -> Vec<u8> {
        super::super::wire::bytes_of(t)
    }

    #[test]
    fn byte_sums_equal_torch_sums_for_every_carried_dtype() {
        for kind in [
            Kind::Float,
            Kind::Double,
            Kind::Half,
            Kind::BFloat16,
            Kind::Int64,
            Kind::Int,
            Kind::Int16,
            Kind::Int8,
            Kind::Uint8,
        ] {
            let a =
                (Tensor::arange(37, (Kind::Double, tch::Device::Cpu)) * 1.37 - 9.0).to_kind(kind);
            let b =
                (Tensor::arange(37, (Kind::Double, tch::Device::Cpu)) * -0.71 + 3.3).to_kind(kind);
            let mut acc = bytes(&a);
            adder_for(kind).unwrap()(&mut acc, &bytes(&b));
            assert_eq!(acc, bytes(&(&a + &b)), "{kind:?}");
        }
        assert!(adder_for(Kind::Bool).is_none());
    }
}
