use super::*;
use postgres_protocol::message::frontend;

#[test]
fn the_first_bytes_after_login_are_checked_against_every_frontend_type() {
    for tag in 0..=u8::MAX {
        let known = !matches!(
            decode_frontend(tag, &[]),
            Err(WireError::UnknownFrontendTag(_))
        );
        let checked = check_frontend_start(&[tag, 0, 0, 0, 4], 1 << 20);
        assert_eq!(checked.is_ok(), known, "message type {tag}");
    }
    assert!(
        check_frontend_start(b"Q", 1 << 20).is_ok(),
        "too short to tell"
    );
    assert!(matches!(
        check_frontend_start(&[b'Q', 0, 0, 0, 3], 1 << 20),
        Err(WireError::BadLength(3))
    ));
    assert!(matches!(
        check_frontend_start(&[b'Q', 0x7f, 0, 0, 0], 1 << 20),
        Err(WireError::TooLarge { .. })
    ));
}

fn startup(params: &[(&str, &str)]) -> BytesMut {
    let mut buf = BytesMut::new();
    frontend::startup_message(params.iter().copied(), &mut buf).unwrap();
    buf
}

#[test]
fn startup_message_round_trip() {
    let mut buf = startup(&[("user", "alice"), ("database", "app")]);
    buf.extend_from_slice(b"extra");
    let Some(StartupPacket::Startup(m)) = decode_startup(&mut buf).unwrap() else {
        panic!("not a startup message")
    };
    assert_eq!(m.minor, 0);
    assert_eq!(m.param("user"), Some("alice"));
    assert_eq!(m.param("database"), Some("app"));
    assert_eq!(&buf[..], b"extra", "only the packet is consumed");
}

#[test]
fn startup_partial_needs_more() {
    let full = startup(&[("user", "alice")]);
    for cut in 0..full.len() {
        let mut buf = BytesMut::from(&full[..cut]);
        assert_eq!(decode_startup(&mut buf), Ok(None), "cut at {cut}");
    }
}

#[test]
fn startup_requests() {
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    assert_eq!(
        decode_startup(&mut buf),
        Ok(Some(StartupPacket::SslRequest))
    );
    let mut buf = BytesMut::new();
    frontend::cancel_request(42, -7, &mut buf);
    assert_eq!(
        decode_startup(&mut buf),
        Ok(Some(StartupPacket::Cancel {
            process_id: 42,
            secret_key: -7
        }))
    );
    let mut buf = BytesMut::from(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30][..]);
    assert_eq!(
        decode_startup(&mut buf),
        Ok(Some(StartupPacket::GssEncRequest))
    );
}

#[test]
fn startup_rejects_bad_input() {
    for len in [0i32, 3, 4, 7, 10_001, -1] {
        let mut buf = BytesMut::from(&len.to_be_bytes()[..]);
        buf.extend_from_slice(&[0; 8]);
        assert!(
            matches!(
                decode_startup(&mut buf),
                Err(WireError::BadStartupLength(_))
            ),
            "length {len}"
        );
    }
    // An unknown request code with major version 1234.
    let mut buf = BytesMut::from(&[0, 0, 0, 8, 0x04, 0xd2, 0x99, 0x99][..]);
    assert!(matches!(
        decode_startup(&mut buf),
        Err(WireError::UnsupportedProtocol { major: 1234, .. })
    ));
    // Protocol 2.0.
    let mut buf = BytesMut::from(&[0, 0, 0, 9, 0, 2, 0, 0, 0][..]);
    assert!(matches!(
        decode_startup(&mut buf),
        Err(WireError::UnsupportedProtocol { major: 2, .. })
    ));
    // A Query as the first message: its tag is read as the high byte of a huge length.
    let mut buf = BytesMut::new();
    frontend::query("select 1", &mut buf).unwrap();
    assert!(matches!(
        decode_startup(&mut buf),
        Err(WireError::BadStartupLength(_))
    ));
    // Missing final NUL, and a duplicate parameter.
    let mut buf = BytesMut::from(&[0, 0, 0, 13, 0, 3, 0, 0, b'u', 0, b'x', 0, b'y'][..]);
    assert!(matches!(
        decode_startup(&mut buf),
        Err(WireError::Malformed { .. })
    ));
    let mut buf = startup(&[("user", "a"), ("user", "b")]);
    assert!(matches!(
        decode_startup(&mut buf),
        Err(WireError::Malformed { .. })
    ));
    // Bytes trailing an SSLRequest inside its own length.
    let mut buf = BytesMut::from(&[0, 0, 0, 9, 0x04, 0xd2, 0x16, 0x2f, 1][..]);
    assert!(decode_startup(&mut buf).is_err());
}

#[test]
fn protocol_3_2_is_decoded_with_its_minor() {
    let mut buf = startup(&[("user", "a")]);
    buf[7] = 2;
    let Some(StartupPacket::Startup(m)) = decode_startup(&mut buf).unwrap() else {
        panic!()
    };
    assert_eq!(m.minor, 2);
}

#[test]
fn framing_limits() {
    assert_eq!(peek_header(b"Q\0\0\0", 100), Ok(None));
    assert_eq!(peek_header(b"Q\0\0\0\0", 100), Err(WireError::BadLength(0)));
    assert_eq!(
        peek_header(b"Q\0\0\0\x03", 100),
        Err(WireError::BadLength(3))
    );
    assert_eq!(
        peek_header(b"Q\xff\xff\xff\xff", 100),
        Err(WireError::BadLength(-1))
    );
    assert_eq!(
        peek_header(b"d\0\0\x01\0", 100),
        Err(WireError::TooLarge { len: 257, max: 100 })
    );
    assert_eq!(
        peek_header(b"S\0\0\0\x04", 100),
        Ok(Some(Header {
            tag: b'S',
            total: 5
        }))
    );
}

#[test]
fn every_frontend_message_decodes() {
    let mut buf = BytesMut::new();
    frontend::query("select 1", &mut buf).unwrap();
    frontend::parse("s1", "select $1", [23], &mut buf).unwrap();
    frontend::bind(
        "p1",
        "s1",
        [1],
        [7i32],
        |v, out| {
            out.extend_from_slice(&v.to_be_bytes());
            Ok(postgres_protocol::IsNull::No)
        },
        [1],
        &mut buf,
    )
    .map_err(|_| ())
    .unwrap();
    frontend::describe(b'P', "p1", &mut buf).unwrap();
    frontend::execute("p1", 0, &mut buf).unwrap();
    frontend::close(b'S', "s1", &mut buf).unwrap();
    frontend::sync(&mut buf);
    frontend::flush(&mut buf);
    frontend::CopyData::new(&b"1\t2\n"[..])
        .unwrap()
        .write(&mut buf);
    frontend::copy_done(&mut buf);
    frontend::copy_fail("oops", &mut buf).unwrap();
    frontend::password_message(b"secret", &mut buf).unwrap();
    frontend::terminate(&mut buf);
    // FunctionCall has no serializer in postgres-protocol: oid 1, one text arg, text result.
    buf.extend_from_slice(b"F\0\0\0\x15\0\0\0\x01\0\x01\0\0\0\x01\0\0\0\x01x\0\0");
    let mut names = Vec::new();
    while let Some((tag, body)) = next_message(&mut buf, 1 << 20).unwrap() {
        let m = decode_frontend(tag, &body).unwrap();
        names.push(m.name());
        if let FrontendMessage::Bind { params, .. } = m {
            assert_eq!(params, 1);
        }
        if let FrontendMessage::AuthResponse(body) = m {
            assert_eq!(decode_password(body), Ok(&b"secret"[..]));
        }
    }
    assert_eq!(
        names,
        [
            "Query",
            "Parse",
            "Bind",
            "Describe",
            "Execute",
            "Close",
            "Sync",
            "Flush",
            "CopyData",
            "CopyDone",
            "CopyFail",
            "PasswordMessage",
            "Terminate",
            "FunctionCall"
        ]
    );
}

#[test]
fn malformed_frontend_messages() {
    let cases: &[(u8, &[u8])] = &[
        (b'Q', b"select 1"),                                 // no NUL
        (b'Q', b"select 1\0junk"),                           // trailing bytes
        (b'P', b"s\0select 1\0\0\x05"),                      // five param types, none present
        (b'B', b"\0\0\0\x01\0\x02\0\x01\0\0\0\x10x"),        // value longer than the message
        (b'B', b"\0\0\0\x01\0\x07\0\0\0\0"),                 // format code 7
        (b'D', b"X\0"),                                      // bad describe target
        (b'E', b"\0\0\0"),                                   // truncated max_rows
        (b'S', b"x"),                                        // Sync with a body
        (b'F', b"\0\0\0\x01\0\0\0\x01\xff\xff\xff\xfe\0\0"), // length -2
        (b'?', b""),                                         // unknown tag
    ];
    for (tag, body) in cases {
        assert!(
            decode_frontend(*tag, body).is_err(),
            "{} {:?} should be rejected",
            char::from(*tag),
            body
        );
    }
}

#[test]
fn backend_messages_decode() {
    let mut buf = BytesMut::new();
    authentication_ok(&mut buf);
    parameter_status(b"server_version", b"15.18", &mut buf);
    backend_key_data(7, 9, &mut buf);
    ready_for_query(TransactionStatus::InTransaction, &mut buf);
    negotiate_protocol_version(0, &["_pq_.x"], &mut buf);
    PgError::fatal("28000", "no mapping")
        .with_hint("see pgiam.toml")
        .encode(&mut buf);
    let mut seen = Vec::new();
    while let Some((tag, body)) = next_message(&mut buf, 1 << 20).unwrap() {
        seen.push(format!("{:?}", decode_backend(tag, &body).unwrap()));
    }
    assert_eq!(seen.len(), 6);
    assert!(seen[0].contains("Ok"));
    assert!(seen[1].contains("ParameterStatus"));
    assert!(seen[2].contains("process_id: 7"));
    assert!(seen[3].contains("InTransaction"));
    assert!(seen[4].contains("NegotiateProtocolVersion"));
    assert!(seen[5].contains("ErrorResponse"));
}

#[test]
fn error_fields_read_back() {
    let mut buf = BytesMut::new();
    PgError::fatal("42501", "no\0pe")
        .with_detail("d")
        .encode(&mut buf);
    let (tag, body) = next_message(&mut buf, 1 << 20).unwrap().unwrap();
    let BackendMessage::ErrorResponse(f) = decode_backend(tag, &body).unwrap() else {
        panic!()
    };
    assert_eq!(f.get_str(b'C'), Some("42501"));
    assert_eq!(f.get_str(b'S'), Some("FATAL"));
    assert_eq!(
        f.get_str(b'M'),
        Some("no?pe"),
        "an embedded NUL cannot split a field"
    );
    assert_eq!(f.get_str(b'D'), Some("d"));
    assert_eq!(f.get(b'H'), None);
}

#[test]
fn authentication_requests_decode() {
    let sasl = b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0";
    assert_eq!(
        decode_backend(b'R', sasl),
        Ok(BackendMessage::Authentication(Authentication::Sasl {
            mechanisms: vec![&b"SCRAM-SHA-256-PLUS"[..], &b"SCRAM-SHA-256"[..]]
        }))
    );
    assert_eq!(
        decode_backend(b'R', b"\0\0\0\x05abcd"),
        Ok(BackendMessage::Authentication(
            Authentication::Md5Password { salt: *b"abcd" }
        ))
    );
    assert!(decode_backend(b'R', b"\0\0\0\x63").is_err());
}
