//! Property tests of every parser a user feeds: listen specs, durations, sizes, counts, address
//! prefixes and banner templates. Arbitrary input never panics; what prints parses back to the
//! same value.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use proptest::prelude::*;

use super::listen_spec::{ByteCount, FaultSpec, ListenSpec, ProxyVersion, Scheme};
use super::values::{count_in, duration_in, format_size, optional_addr, size, MAX_DURATION};
use super::{BannerTemplate, Cidr};

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<u32>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)),
        (any::<u128>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)),
    ]
}

fn byte_count() -> impl Strategy<Value = ByteCount> {
    (0u64..1 << 40, 0u64..1 << 20).prop_map(|(min, span)| ByteCount { min, max: min + span })
}

fn stream_spec() -> impl Strategy<Value = ListenSpec> {
    let proxy = prop::option::of(prop_oneof![
        Just(ProxyVersion::V1),
        Just(ProxyVersion::V2),
        Just(ProxyVersion::Any)
    ]);
    let faults =
        (
            prop::option::of((1u64..10_000_000).prop_map(Duration::from_millis)),
            prop::option::of(1u64..1 << 40),
            prop::option::of(0u64..1 << 40),
            prop::option::of(byte_count()),
            prop::option::of(byte_count()),
            prop::option::of((0u32..=1000).prop_map(|p| f64::from(p) / 1000.0)),
        )
            .prop_map(|(delay, rate, stall_after, close_after, reset_after, reset_probability)| {
                FaultSpec { delay, rate, stall_after, close_after, reset_after, reset_probability }
            });
    (prop_oneof![Just(Scheme::Tcp), Just(Scheme::Tls)], socket_addr(), proxy, faults)
        .prop_map(|(scheme, addr, proxy, faults)| ListenSpec { scheme, addr, proxy, faults })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn listen_specs_round_trip(spec in stream_spec()) {
        let text = spec.to_string();
        prop_assert_eq!(text.parse::<ListenSpec>(), Ok(spec), "{}", text);
    }

    #[test]
    fn udp_specs_round_trip(addr in socket_addr()) {
        let spec = ListenSpec { scheme: Scheme::Udp, addr, proxy: None, faults: FaultSpec::default() };
        prop_assert_eq!(spec.to_string().parse::<ListenSpec>(), Ok(spec));
    }

    #[test]
    fn arbitrary_text_never_panics_a_parser(s in "\\PC{0,80}") {
        let _ = s.parse::<ListenSpec>();
        let _ = s.parse::<BannerTemplate>();
        let _ = s.parse::<Cidr>();
        let _ = size(&s);
        let _ = duration_in(&s, Duration::ZERO, MAX_DURATION);
        let _ = count_in(&s, 0, u64::MAX);
        let _ = optional_addr(&s);
    }

    #[test]
    fn spec_shaped_text_never_panics(
        scheme in "(tcp|tls|udp|TCP|x)?(://)?",
        addr in "(\\[[0-9a-f:]{0,12}\\]|[0-9.]{0,15}):[0-9]{0,6}",
        query in "(\\?[a-z_]{0,18}=[0-9a-zA-Z.\\- ]{0,10}(&[a-z_]{0,18}=[0-9a-zA-Z.\\-]{0,10}){0,4})?",
    ) {
        let _ = format!("{scheme}{addr}{query}").parse::<ListenSpec>();
    }

    #[test]
    fn sizes_print_and_parse_back(n in any::<u64>()) {
        prop_assert_eq!(size(&format_size(n)), Ok(n));
    }

    #[test]
    fn durations_print_and_parse_back(ms in 0u64..MAX_DURATION.as_millis() as u64) {
        let d = Duration::from_millis(ms);
        let text = humantime::format_duration(d).to_string();
        prop_assert_eq!(duration_in(&text, Duration::ZERO, MAX_DURATION), Ok(d));
    }

    #[test]
    fn prefixes_print_and_parse_back(ip in any::<u128>(), v6 in any::<bool>(), len in 0u8..=128) {
        let (addr, len) = if v6 {
            (IpAddr::V6(Ipv6Addr::from(ip)), len)
        } else {
            (IpAddr::V4(Ipv4Addr::from(ip as u32)), len % 33)
        };
        let cidr = format!("{addr}/{len}").parse::<Cidr>();
        prop_assert!(cidr.is_ok(), "{addr}/{len}: {cidr:?}");
        let cidr = cidr.unwrap();
        prop_assert_eq!(cidr.to_string().parse::<Cidr>(), Ok(cidr));
        prop_assert!(cidr.contains(addr));
    }

    #[test]
    fn banner_templates_print_and_parse_back(s in "[a-z{}{ }_ ]{0,40}") {
        if let Ok(template) = s.parse::<BannerTemplate>() {
            prop_assert_eq!(template.to_string().parse::<BannerTemplate>(), Ok(template));
        }
    }
}
