//! SMS segment counting, matching how carriers (and Twilio) split messages.
//!
//! * GSM-7 (GSM 03.38): 160 septets in a single SMS, 153 per part when
//!   concatenated (7 septets go to the UDH). Extension-table characters cost
//!   2 septets (ESC + char) and an ESC pair is never split across parts.
//! * UCS-2: 70 UTF-16 units in a single SMS, 67 per part when concatenated.
//!   Characters outside the BMP cost 2 units (surrogate pair), never split.

/// Character encoding a message body will be sent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Gsm7,
    Ucs2,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Gsm7 => "GSM-7",
            Encoding::Ucs2 => "UCS-2",
        }
    }
}

/// Result of [`analyze`]: `units` is septets for GSM-7, UTF-16 code units for UCS-2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentInfo {
    pub encoding: Encoding,
    pub units: usize,
    pub segments: u32,
}

/// GSM 03.38 default alphabet, in table order (0x00..=0x7F). 0x1B (ESC) is
/// not a printable character, so it is omitted: 127 chars.
const GSM7_BASIC: &str = concat!(
    "@£$¥èéùìòÇ\nØø\rÅå",
    "Δ_ΦΓΛΩΠΨΣΘΞ",
    /* 0x1B ESC */ "ÆæßÉ",
    " !\"#¤%&'()*+,-./",
    "0123456789:;<=>?",
    "¡ABCDEFGHIJKLMNO",
    "PQRSTUVWXYZÄÖÑÜ§",
    "¿abcdefghijklmno",
    "pqrstuvwxyzäöñüà",
);

/// GSM 03.38 extension table: each costs 2 septets (ESC + char).
const GSM7_EXTENSION: &str = "^{}\\[~]|€\x0C";

/// Septet cost of `c` in GSM-7, or `None` if it is not representable.
fn gsm7_cost(c: char) -> Option<usize> {
    if GSM7_BASIC.contains(c) {
        Some(1)
    } else if GSM7_EXTENSION.contains(c) {
        Some(2)
    } else {
        None
    }
}

/// Count segments given each character's unit cost. Fits in one segment if
/// the total is <= `single`; otherwise fill `multi`-sized parts greedily so a
/// multi-unit character (ESC pair / surrogate pair) moves whole to the next part.
fn count_segments(
    costs: impl Iterator<Item = usize>,
    total: usize,
    single: usize,
    multi: usize,
) -> u32 {
    if total <= single {
        return 1; // includes the empty body: carriers still send one SMS
    }
    let (mut segments, mut used) = (1u32, 0usize);
    for cost in costs {
        if used + cost > multi {
            segments += 1;
            used = 0;
        }
        used += cost;
    }
    segments
}

/// Determine encoding, unit count and number of SMS segments for `body`.
pub fn analyze(body: &str) -> SegmentInfo {
    // GSM-7 if every char is in the basic or extension table.
    let gsm: Option<usize> = body.chars().map(gsm7_cost).sum();
    if let Some(units) = gsm {
        let costs = body.chars().map(|c| gsm7_cost(c).unwrap_or(1));
        return SegmentInfo {
            encoding: Encoding::Gsm7,
            units,
            segments: count_segments(costs, units, 160, 153),
        };
    }
    // Otherwise UCS-2, counted in UTF-16 code units.
    let units = body.encode_utf16().count();
    SegmentInfo {
        encoding: Encoding::Ucs2,
        units,
        segments: count_segments(body.chars().map(char::len_utf16), units, 70, 67),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rep(c: char, n: usize) -> String {
        std::iter::repeat_n(c, n).collect()
    }

    fn check(body: &str, enc: Encoding, units: usize, segments: u32) {
        assert_eq!(
            analyze(body),
            SegmentInfo {
                encoding: enc,
                units,
                segments
            },
            "body: {body:?}"
        );
    }

    #[test]
    fn basic_alphabet_is_complete() {
        assert_eq!(GSM7_BASIC.chars().count(), 127); // 128 minus ESC
        assert_eq!(Encoding::Gsm7.as_str(), "GSM-7");
        assert_eq!(Encoding::Ucs2.as_str(), "UCS-2");
    }

    #[test]
    fn empty_is_one_gsm_segment() {
        check("", Encoding::Gsm7, 0, 1);
    }

    #[test]
    fn gsm7_boundaries() {
        check(&rep('a', 160), Encoding::Gsm7, 160, 1);
        check(&rep('a', 161), Encoding::Gsm7, 161, 2);
        check(&rep('a', 306), Encoding::Gsm7, 306, 2);
        check(&rep('a', 307), Encoding::Gsm7, 307, 3);
    }

    #[test]
    fn ucs2_boundaries() {
        check(&rep('Ж', 70), Encoding::Ucs2, 70, 1);
        check(&rep('Ж', 71), Encoding::Ucs2, 71, 2);
        check(&rep('Ж', 134), Encoding::Ucs2, 134, 2);
        check(&rep('Ж', 135), Encoding::Ucs2, 135, 3);
    }

    #[test]
    fn extension_chars_cost_two_septets() {
        check(&rep('€', 80), Encoding::Gsm7, 160, 1);
        check(&rep('€', 81), Encoding::Gsm7, 162, 2);
        check(&(rep('a', 159) + "{"), Encoding::Gsm7, 161, 2);
        for c in "^{}\\[~]|€\x0C".chars() {
            check(&c.to_string(), Encoding::Gsm7, 2, 1);
        }
    }

    #[test]
    fn escape_pair_not_split_across_segments() {
        // 152 + 2 + 152 = 306 septets: naive ceil(306/153) = 2, but '[' would
        // straddle the 153 boundary, so it moves to part 2 (2+152 = 154 > 153).
        let body = rep('a', 152) + "[" + &rep('a', 152);
        check(&body, Encoding::Gsm7, 306, 3);
        // Same with one fewer trailing char: part 2 is exactly 153.
        let body = rep('a', 152) + "[" + &rep('a', 151);
        check(&body, Encoding::Gsm7, 305, 2);
    }

    #[test]
    fn emoji_forces_ucs2_and_counts_two_units() {
        check("hi 😀", Encoding::Ucs2, 5, 1);
        // Surrogate pair straddling the 67 boundary is pushed whole.
        let body = rep('Ж', 66) + "😀" + &rep('Ж', 66);
        check(&body, Encoding::Ucs2, 134, 3);
    }

    #[test]
    fn charset_membership() {
        check("é£", Encoding::Gsm7, 2, 1);
        check("line1\nline2\r\n", Encoding::Gsm7, 13, 1);
        assert_eq!(analyze("ê").encoding, Encoding::Ucs2);
        assert_eq!(analyze("it’s").encoding, Encoding::Ucs2);
        assert_eq!(analyze("ç").encoding, Encoding::Ucs2); // only capital Ç is in 03.38
    }
}
