//! The `nat` address pool: 172.16.0.0/16, gateway 172.16.0.1, guests from 172.16.0.2.
//! Allocation itself happens in the state database ([`crate::store::Store::allocate_address`]),
//! inside one immediate transaction: lowest free address first, reused after delete.

use std::net::Ipv4Addr;

/// The pool, in CIDR notation.
pub const POOL_CIDR: &str = "172.16.0.0/16";
/// The pool's network address.
pub const POOL: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 0);
/// The host's address on every TAP: the guests' gateway.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 1);
/// Lowest guest offset in the pool (172.16.0.2).
pub const FIRST_OFFSET: u32 = 2;
/// Highest guest offset in the pool (172.16.255.254).
pub const LAST_OFFSET: u32 = 0xfffe;

/// The address at `offset` in the pool.
pub fn addr_at(offset: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(POOL) + offset)
}

/// The offset of `addr` in the pool, if it is a guest address of the pool.
pub fn offset_of(addr: Ipv4Addr) -> Option<u32> {
    let off = u32::from(addr).wrapping_sub(u32::from(POOL));
    (FIRST_OFFSET..=LAST_OFFSET).contains(&off).then_some(off)
}

/// The TAP (and nft chain) name of the VM at `addr`: `smv` and the 4 hex digits of its
/// offset in the pool (unique, since addresses are; 7 characters).
pub fn tap_name(addr: Ipv4Addr) -> String {
    let off = u32::from(addr).wrapping_sub(u32::from(POOL)) & 0xffff;
    format!("{}{off:04x}", super::TAP_PREFIX)
}

/// Whether `addr` lies in `net/prefix`.
pub fn contains(net: Ipv4Addr, prefix: u8, addr: Ipv4Addr) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    u32::from(addr) & mask == u32::from(net) & mask
}

/// The lowest offset not in `used` (sorted ascending), or `None` when the pool is full.
pub fn lowest_free(used: &[u32]) -> Option<u32> {
    let mut want = FIRST_OFFSET;
    for &u in used {
        if u < want {
            continue;
        }
        if u > want {
            break;
        }
        want += 1;
    }
    (want <= LAST_OFFSET).then_some(want)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_offsets() {
        assert_eq!(addr_at(2), Ipv4Addr::new(172, 16, 0, 2));
        assert_eq!(addr_at(300), Ipv4Addr::new(172, 16, 1, 44));
        assert_eq!(offset_of(Ipv4Addr::new(172, 16, 1, 44)), Some(300));
        assert_eq!(offset_of(GATEWAY), None);
        assert_eq!(offset_of(Ipv4Addr::new(172, 17, 0, 2)), None);
        assert_eq!(tap_name(addr_at(2)), "smv0002");
        assert_eq!(tap_name(addr_at(LAST_OFFSET)), "smvfffe");
        assert!(tap_name(addr_at(LAST_OFFSET)).len() <= 15);
        assert!(contains(
            Ipv4Addr::new(10, 0, 0, 0),
            8,
            Ipv4Addr::new(10, 9, 8, 7)
        ));
        assert!(!contains(
            Ipv4Addr::new(10, 0, 0, 0),
            8,
            Ipv4Addr::new(11, 0, 0, 1)
        ));
        assert!(contains(
            Ipv4Addr::UNSPECIFIED,
            0,
            Ipv4Addr::new(1, 2, 3, 4)
        ));
    }

    #[test]
    fn lowest_free_fills_gaps() {
        assert_eq!(lowest_free(&[]), Some(2));
        assert_eq!(lowest_free(&[2, 3, 5]), Some(4));
        assert_eq!(lowest_free(&[3]), Some(2));
        let full: Vec<u32> = (FIRST_OFFSET..=LAST_OFFSET).collect();
        assert_eq!(lowest_free(&full), None);
    }
}
