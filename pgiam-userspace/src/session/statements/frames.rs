//! What the gate reads from a message's own bytes beyond what wire.rs decodes: a Bind's
//! parameter values (for set_config() decided at Bind) and a Parse's declared types.

/// The parameters of a Bind message, read from its bytes (header included; wire.rs has
/// checked its framing).
pub(super) struct BindParameters<'a> {
    formats: Vec<u16>,
    /// `None`: SQL NULL.
    values: Vec<Option<&'a [u8]>>,
}

/// Reads the frame's fields in order.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }

    fn cstr(&mut self) -> Option<&'a [u8]> {
        let end = self.0.iter().position(|&b| b == 0)?;
        let s = self.take(end)?;
        self.take(1)?;
        Some(s)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
}

impl<'a> BindParameters<'a> {
    pub(super) fn read(frame: &'a [u8]) -> Option<BindParameters<'a>> {
        let mut f = Fields(frame);
        (f.take(5)?.first() == Some(&b'B')).then_some(())?;
        f.cstr()?;
        f.cstr()?;
        let formats = (0..f.u16()?).map(|_| f.u16()).collect::<Option<Vec<_>>>()?;
        let values = (0..f.u16()?)
            .map(|_| match f.i32()? {
                -1 => Some(None),
                n => f.take(usize::try_from(n).ok()?).map(Some),
            })
            .collect::<Option<Vec<_>>>()?;
        Some(BindParameters { formats, values })
    }

    /// Parameter `$n`'s value as set_config() would take it, if pgiam can read it: a text
    /// value (text or binary format, the same bytes for text; of a type left to the server,
    /// which infers text, or declared text or varchar), ASCII like every encoding name and
    /// boolean. `Ok(None)`: NULL.
    pub(super) fn text(&self, n: u32, declared: &[u32]) -> Result<Option<String>, String> {
        const TEXT: u32 = 25;
        const VARCHAR: u32 = 1043;
        let i = (n as usize)
            .checked_sub(1)
            .ok_or_else(|| format!("there is no parameter ${n}"))?;
        let value = *self
            .values
            .get(i)
            .ok_or_else(|| format!("the Bind message binds no parameter ${n}"))?;
        let format = match self.formats.len() {
            0 => 0,
            1 => self.formats[0],
            _ => self.formats.get(i).copied().unwrap_or(u16::MAX),
        };
        let oid = declared.get(i).copied().unwrap_or(0);
        if !matches!(oid, 0 | TEXT | VARCHAR) || format > 1 {
            return Err(format!(
                "parameter ${n} (type oid {oid}, format {format}) is not text pgiam can read"
            ));
        }
        match value {
            None => Ok(None),
            Some(v) if v.is_ascii() => Ok(Some(String::from_utf8_lossy(v).into_owned())),
            Some(_) => Err(format!("parameter ${n} is not ASCII")),
        }
    }
}

/// The parameter types a Parse message declares (`frame`: its bytes, header included).
pub(super) fn parse_param_types(frame: &[u8]) -> Option<Vec<u32>> {
    let mut f = Fields(frame);
    (f.take(5)?.first() == Some(&b'P')).then_some(())?;
    f.cstr()?;
    f.cstr()?;
    (0..f.u16()?).map(|_| f.i32().map(|t| t as u32)).collect()
}
