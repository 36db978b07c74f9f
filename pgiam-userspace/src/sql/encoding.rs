//! Client encodings, as PostgreSQL names them, and how pgiam reads statement text in them.
//!
//! pgiam parses UTF-8. A client may send its statements in another encoding (the server
//! converts them to the database's); pgiam then transcodes the text for parsing and forwards
//! the client's bytes untouched. That is only sound in encodings where every byte of a
//! multibyte character is 0x80 or above ("ASCII-safe"): there an ASCII byte is always that
//! ASCII character, so quotes, backslashes, semicolons, comments and every ASCII identifier
//! read identically in all of them, and in UTF-8. Only the non-ASCII characters differ, and
//! pgiam's transcoding keeps each of them non-ASCII: statements split and tokenize as the
//! server's do whichever ASCII-safe encoding the server is in when it reads them. (What a
//! non-ASCII character *is* still depends on the encoding; the session decides what to do
//! about names that contain one.)
//!
//! In the others (SJIS, BIG5, GBK, UHC, GB18030, JOHAB, SHIFT_JIS_2004) a multibyte
//! character can end in an ASCII byte such as `\` or `'`: pgiam cannot read them at all.

use std::borrow::Cow;

/// A client encoding PostgreSQL knows, by its canonical name's spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientEncoding {
    Utf8,
    SqlAscii,
    EucJp,
    EucCn,
    EucKr,
    EucTw,
    EucJis2004,
    MuleInternal,
    Latin1,
    Latin2,
    Latin3,
    Latin4,
    Latin5,
    Latin6,
    Latin7,
    Latin8,
    Latin9,
    Latin10,
    Win1250,
    Win1251,
    Win1252,
    Win1253,
    Win1254,
    Win1255,
    Win1256,
    Win1257,
    Win1258,
    Win866,
    Win874,
    Koi8r,
    Koi8u,
    Iso8859_5,
    Iso8859_6,
    Iso8859_7,
    Iso8859_8,
    Sjis,
    Big5,
    Gbk,
    Uhc,
    Gb18030,
    Johab,
    ShiftJis2004,
    /// The server did not say: read as if it could be any ASCII-safe encoding.
    Unknown,
}

use ClientEncoding::*;

/// PostgreSQL's encoding names and aliases (`pg_encname_tbl`), as `clean_encoding_name`
/// leaves them: ASCII letters and digits only, lower case.
const NAMES: &[(&str, ClientEncoding)] = &[
    ("abc", Win1258),
    ("alt", Win866),
    ("big5", Big5),
    ("euccn", EucCn),
    ("eucjis2004", EucJis2004),
    ("eucjp", EucJp),
    ("euckr", EucKr),
    ("euctw", EucTw),
    ("gb18030", Gb18030),
    ("gbk", Gbk),
    ("iso88591", Latin1),
    ("iso885910", Latin6),
    ("iso885913", Latin7),
    ("iso885914", Latin8),
    ("iso885915", Latin9),
    ("iso885916", Latin10),
    ("iso88592", Latin2),
    ("iso88593", Latin3),
    ("iso88594", Latin4),
    ("iso88595", Iso8859_5),
    ("iso88596", Iso8859_6),
    ("iso88597", Iso8859_7),
    ("iso88598", Iso8859_8),
    ("iso88599", Latin5),
    ("johab", Johab),
    ("koi8", Koi8r),
    ("koi8r", Koi8r),
    ("koi8u", Koi8u),
    ("latin1", Latin1),
    ("latin10", Latin10),
    ("latin2", Latin2),
    ("latin3", Latin3),
    ("latin4", Latin4),
    ("latin5", Latin5),
    ("latin6", Latin6),
    ("latin7", Latin7),
    ("latin8", Latin8),
    ("latin9", Latin9),
    ("mskanji", Sjis),
    ("muleinternal", MuleInternal),
    ("shiftjis", Sjis),
    ("shiftjis2004", ShiftJis2004),
    ("sjis", Sjis),
    ("sqlascii", SqlAscii),
    ("tcvn", Win1258),
    ("tcvn5712", Win1258),
    ("uhc", Uhc),
    ("unicode", Utf8),
    ("utf8", Utf8),
    ("vscii", Win1258),
    ("win", Win1251),
    ("win1250", Win1250),
    ("win1251", Win1251),
    ("win1252", Win1252),
    ("win1253", Win1253),
    ("win1254", Win1254),
    ("win1255", Win1255),
    ("win1256", Win1256),
    ("win1257", Win1257),
    ("win1258", Win1258),
    ("win866", Win866),
    ("win874", Win874),
    ("win932", Sjis),
    ("win936", Gbk),
    ("win949", Uhc),
    ("win950", Big5),
    ("windows1250", Win1250),
    ("windows1251", Win1251),
    ("windows1252", Win1252),
    ("windows1253", Win1253),
    ("windows1254", Win1254),
    ("windows1255", Win1255),
    ("windows1256", Win1256),
    ("windows1257", Win1257),
    ("windows1258", Win1258),
    ("windows866", Win866),
    ("windows874", Win874),
    ("windows932", Sjis),
    ("windows936", Gbk),
    ("windows949", Uhc),
    ("windows950", Big5),
];

/// What stands for a byte pgiam has no table for: non-ASCII, like the byte.
const PLACEHOLDER: char = '\u{FFFD}';

impl ClientEncoding {
    /// The encoding a client_encoding value names, as PostgreSQL looks it up (ignoring case
    /// and everything but ASCII letters and digits); `None` if PostgreSQL knows no such name.
    /// (Compared as it is read, not cleaned into a string first: every pooled transaction
    /// looks its backend's encoding up again.)
    pub fn from_name(value: &str) -> Option<ClientEncoding> {
        let clean = || {
            value
                .bytes()
                .filter(u8::is_ascii_alphanumeric)
                .map(|b| b.to_ascii_lowercase())
        };
        NAMES
            .iter()
            .find(|(n, _)| n.bytes().eq(clean()))
            .map(|&(_, e)| e)
    }

    /// PostgreSQL's canonical name (what the server reports).
    pub fn name(self) -> &'static str {
        match self {
            Utf8 => "UTF8",
            SqlAscii => "SQL_ASCII",
            EucJp => "EUC_JP",
            EucCn => "EUC_CN",
            EucKr => "EUC_KR",
            EucTw => "EUC_TW",
            EucJis2004 => "EUC_JIS_2004",
            MuleInternal => "MULE_INTERNAL",
            Latin1 => "LATIN1",
            Latin2 => "LATIN2",
            Latin3 => "LATIN3",
            Latin4 => "LATIN4",
            Latin5 => "LATIN5",
            Latin6 => "LATIN6",
            Latin7 => "LATIN7",
            Latin8 => "LATIN8",
            Latin9 => "LATIN9",
            Latin10 => "LATIN10",
            Win1250 => "WIN1250",
            Win1251 => "WIN1251",
            Win1252 => "WIN1252",
            Win1253 => "WIN1253",
            Win1254 => "WIN1254",
            Win1255 => "WIN1255",
            Win1256 => "WIN1256",
            Win1257 => "WIN1257",
            Win1258 => "WIN1258",
            Win866 => "WIN866",
            Win874 => "WIN874",
            Koi8r => "KOI8R",
            Koi8u => "KOI8U",
            Iso8859_5 => "ISO_8859_5",
            Iso8859_6 => "ISO_8859_6",
            Iso8859_7 => "ISO_8859_7",
            Iso8859_8 => "ISO_8859_8",
            Sjis => "SJIS",
            Big5 => "BIG5",
            Gbk => "GBK",
            Uhc => "UHC",
            Gb18030 => "GB18030",
            Johab => "JOHAB",
            ShiftJis2004 => "SHIFT_JIS_2004",
            Unknown => "unknown",
        }
    }

    /// Every byte of a multibyte character is 0x80 or above: statements split the same in
    /// this encoding as in every other such one.
    pub fn is_ascii_safe(self) -> bool {
        !matches!(
            self,
            Sjis | Big5 | Gbk | Uhc | Gb18030 | Johab | ShiftJis2004
        )
    }

    /// encoding_rs's decoder for a run of non-ASCII bytes, where its table is PostgreSQL's
    /// (for the characters both have). ISO-8859-1 and -9 are not here: encoding_rs reads
    /// those labels as windows-1252 and -1254, which differ in 0x80–0x9F.
    fn decoder(self) -> Option<&'static encoding_rs::Encoding> {
        use encoding_rs as rs;
        Some(match self {
            Latin2 => rs::ISO_8859_2,
            Latin3 => rs::ISO_8859_3,
            Latin4 => rs::ISO_8859_4,
            Latin6 => rs::ISO_8859_10,
            Latin7 => rs::ISO_8859_13,
            Latin8 => rs::ISO_8859_14,
            Latin9 => rs::ISO_8859_15,
            Latin10 => rs::ISO_8859_16,
            Iso8859_5 => rs::ISO_8859_5,
            Iso8859_6 => rs::ISO_8859_6,
            Iso8859_7 => rs::ISO_8859_7,
            Iso8859_8 => rs::ISO_8859_8,
            Win1250 => rs::WINDOWS_1250,
            Win1251 => rs::WINDOWS_1251,
            Win1252 => rs::WINDOWS_1252,
            Win1253 => rs::WINDOWS_1253,
            Win1254 => rs::WINDOWS_1254,
            Win1255 => rs::WINDOWS_1255,
            Win1256 => rs::WINDOWS_1256,
            Win1257 => rs::WINDOWS_1257,
            Win1258 => rs::WINDOWS_1258,
            Win866 => rs::IBM866,
            Win874 => rs::WINDOWS_874,
            Koi8r => rs::KOI8_R,
            Koi8u => rs::KOI8_U,
            EucJp => rs::EUC_JP,
            // GB 2312 and KS X 1001 in EUC form, both bytes 0xA1 or above: the same
            // characters in GBK's and windows-949's tables, which are supersets.
            EucCn => rs::GBK,
            EucKr => rs::EUC_KR,
            _ => return None,
        })
    }

    /// The statement text as UTF-8 for parsing, with its lexical structure kept: every ASCII
    /// byte is that character, every run of other bytes becomes non-ASCII characters only
    /// (decoded where pgiam has the encoding's table, a placeholder each where it has not).
    /// `None` for an encoding that is not ASCII-safe. UTF-8 that is not valid is read with
    /// placeholders too (the server would refuse it).
    pub fn decode(self, bytes: &[u8]) -> Option<Cow<'_, str>> {
        if !self.is_ascii_safe() {
            return None;
        }
        if let Ok(text) = std::str::from_utf8(bytes) {
            if self == Utf8 || self == SqlAscii || text.is_ascii() {
                return Some(Cow::Borrowed(text));
            }
        }
        let mut out = String::with_capacity(bytes.len() + bytes.len() / 2);
        let mut rest = bytes;
        while !rest.is_empty() {
            let ascii = rest
                .iter()
                .position(|b| !b.is_ascii())
                .unwrap_or(rest.len());
            // ASCII bytes are valid UTF-8 as they are.
            out.push_str(std::str::from_utf8(&rest[..ascii]).expect("ASCII"));
            rest = &rest[ascii..];
            let high = rest.iter().position(u8::is_ascii).unwrap_or(rest.len());
            self.decode_run(&rest[..high], &mut out);
            rest = &rest[high..];
        }
        Some(Cow::Owned(out))
    }

    /// Decodes bytes that are all 0x80 or above into non-ASCII characters.
    fn decode_run(self, run: &[u8], out: &mut String) {
        match self {
            // A SQL_ASCII client's bytes reach the server unconverted, and are checked as
            // the database's encoding (UTF-8).
            Utf8 | SqlAscii => out.push_str(&String::from_utf8_lossy(run)),
            Latin1 => out.extend(run.iter().map(|&b| char::from(b))),
            Latin5 => out.extend(run.iter().map(|&b| latin5(b))),
            _ => match self.decoder() {
                Some(d) => {
                    let (text, _) = d.decode_without_bom_handling(run);
                    // No table maps a non-ASCII byte to ASCII; if one did, it would not
                    // be read as ASCII here.
                    out.extend(
                        text.chars()
                            .map(|c| if c.is_ascii() { PLACEHOLDER } else { c }),
                    );
                }
                None => out.extend(run.iter().map(|_| PLACEHOLDER)),
            },
        }
    }
}

/// ISO-8859-9: ISO-8859-1 with six Turkish letters in place of Icelandic ones.
fn latin5(b: u8) -> char {
    match b {
        0xD0 => '\u{011E}',
        0xDD => '\u{0130}',
        0xDE => '\u{015E}',
        0xF0 => '\u{011F}',
        0xFD => '\u{0131}',
        0xFE => '\u{015F}',
        _ => char::from(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_looked_up_as_postgresql_does() {
        assert_eq!(ClientEncoding::from_name("UTF8"), Some(Utf8));
        assert_eq!(ClientEncoding::from_name("unicode"), Some(Utf8));
        assert_eq!(ClientEncoding::from_name("utf-8"), Some(Utf8));
        assert_eq!(ClientEncoding::from_name("Latin-9"), Some(Latin9));
        assert_eq!(ClientEncoding::from_name("ISO_8859-15"), Some(Latin9));
        assert_eq!(ClientEncoding::from_name("euc_jp"), Some(EucJp));
        assert_eq!(ClientEncoding::from_name("Shift_JIS"), Some(Sjis));
        assert_eq!(ClientEncoding::from_name("windows-936"), Some(Gbk));
        assert_eq!(ClientEncoding::from_name("latin11"), None);
        assert_eq!(ClientEncoding::from_name(""), None);
        assert!(
            NAMES.windows(2).all(|w| w[0].0 < w[1].0),
            "sorted, no repeats"
        );
        // Every canonical name is found as itself.
        for &(_, e) in NAMES {
            assert_eq!(ClientEncoding::from_name(e.name()), Some(e), "{e:?}");
        }
        let unsafe_ones: Vec<_> = NAMES
            .iter()
            .filter(|(_, e)| !e.is_ascii_safe())
            .map(|(_, e)| e.name())
            .collect();
        for n in [
            "SJIS",
            "BIG5",
            "GBK",
            "UHC",
            "GB18030",
            "JOHAB",
            "SHIFT_JIS_2004",
        ] {
            assert!(unsafe_ones.contains(&n), "{n}");
        }
    }

    #[test]
    fn text_is_transcoded_with_its_ascii_structure_kept() {
        let d = |e: ClientEncoding, b: &[u8]| e.decode(b).unwrap().into_owned();
        assert_eq!(d(Latin9, b"SELECT '\xa4'"), "SELECT '€'");
        assert_eq!(d(Latin1, b"SELECT '\xa4\x80'"), "SELECT '¤\u{80}'");
        assert_eq!(d(Latin5, b"'\xd0\xfd\xe9'"), "'Ğıé'");
        assert_eq!(d(EucJp, b"'\xa4\xb5'"), "'さ'");
        assert_eq!(d(EucKr, b"'\xb0\xa1'"), "'가'");
        assert_eq!(d(EucCn, b"'\xb0\xa1'"), "'啊'");
        assert_eq!(d(Win1251, b"'\xc0'"), "'А'");
        // A lead byte followed by ASCII: the ASCII byte stays itself, even where the
        // encoding_rs decoder (windows-949 for EUC-KR) would take it as a trail byte.
        assert_eq!(d(EucKr, b"'\xb0A'"), "'\u{FFFD}A'");
        assert_eq!(d(EucJp, b"'\xa4\\'"), "'\u{FFFD}\\'");
        // No table: one placeholder per byte.
        assert_eq!(d(EucTw, b"'\xa4\xa1'"), "'\u{FFFD}\u{FFFD}'");
        assert_eq!(d(MuleInternal, b"x\x81\xe9"), "x\u{FFFD}\u{FFFD}");
        // UTF-8 that is not valid, and SQL_ASCII read as the database's UTF-8.
        assert_eq!(d(Utf8, b"'\xe9'; x"), "'\u{FFFD}'; x");
        assert_eq!(d(SqlAscii, "'é'".as_bytes()), "'é'");
        assert!(Sjis.decode(b"x").is_none());
        // Whatever the bytes, the ASCII ones are where they were and nothing else is ASCII.
        let all: Vec<u8> = (1..=255).collect();
        for e in NAMES.iter().map(|&(_, e)| e).filter(|e| e.is_ascii_safe()) {
            let text = d(e, &all);
            let ascii: String = text.chars().filter(char::is_ascii).collect();
            assert_eq!(ascii.as_bytes(), &all[..127], "{e:?}");
        }
    }
}
