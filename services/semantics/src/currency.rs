//! ISO 4217 currency codes and their minor-unit exponents.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A validated ISO 4217 code (three capitals of an active currency).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Currency([u8; 3]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CurrencyError {
    #[error("'{0}' is not three capital letters (an ISO 4217 code such as USD)")]
    Format(String),
    #[error("'{0}' is not an active ISO 4217 currency code")]
    Unknown(String),
}

// Minor-unit exponents that are not 2. Every other code listed in ISO_4217_CODES has 2.
const EXPONENT_0: &[&str] = &[
    "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI", "VND",
    "VUV", "XAF", "XOF", "XPF",
];
const EXPONENT_3: &[&str] = &["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"];
const EXPONENT_4: &[&str] = &["CLF", "UYW"];

// Active codes with a minor unit (funds and precious metals without one are excluded).
const ISO_4217_CODES: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT",
    "BGN", "BHD", "BIF", "BMD", "BND", "BOB", "BOV", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD",
    "CAD", "CDF", "CHE", "CHF", "CHW", "CLF", "CLP", "CNY", "COP", "COU", "CRC", "CUP", "CVE",
    "CZK", "DJF", "DKK", "DOP", "DZD", "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL",
    "GHS", "GIP", "GMD", "GNF", "GTQ", "GYD", "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR",
    "IQD", "IRR", "ISK", "JMD", "JOD", "JPY", "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD",
    "KYD", "KZT", "LAK", "LBP", "LKR", "LRD", "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK",
    "MNT", "MOP", "MRU", "MUR", "MVR", "MWK", "MXN", "MXV", "MYR", "MZN", "NAD", "NGN", "NIO",
    "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK", "PHP", "PKR", "PLN", "PYG", "QAR", "RON",
    "RSD", "RUB", "RWF", "SAR", "SBD", "SCR", "SDG", "SEK", "SGD", "SHP", "SLE", "SOS", "SRD",
    "SSP", "STN", "SVC", "SYP", "SZL", "THB", "TJS", "TMT", "TND", "TOP", "TRY", "TTD", "TWD",
    "TZS", "UAH", "UGX", "USD", "USN", "UYI", "UYU", "UYW", "UZS", "VED", "VES", "VND", "VUV",
    "WST", "XAF", "XCD", "XCG", "XOF", "XPF", "YER", "ZAR", "ZMW", "ZWG",
];

impl Currency {
    pub const USD: Currency = Currency(*b"USD");

    pub fn parse(code: &str) -> Result<Currency, CurrencyError> {
        let bytes = code.as_bytes();
        if bytes.len() != 3 || !bytes.iter().all(u8::is_ascii_uppercase) {
            return Err(CurrencyError::Format(code.to_string()));
        }
        if ISO_4217_CODES.binary_search(&code).is_err() {
            return Err(CurrencyError::Unknown(code.to_string()));
        }
        Ok(Currency([bytes[0], bytes[1], bytes[2]]))
    }

    pub fn as_str(&self) -> &str {
        // Only ever built from three ASCII capitals.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }

    /// Digits after the decimal point of the currency's minor unit.
    pub fn exponent(&self) -> u32 {
        let code = self.as_str();
        if EXPONENT_0.contains(&code) {
            0
        } else if EXPONENT_3.contains(&code) {
            3
        } else if EXPONENT_4.contains(&code) {
            4
        } else {
            2
        }
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_list_is_sorted_so_binary_search_is_valid() {
        assert!(ISO_4217_CODES.windows(2).all(|w| w[0] < w[1]));
        for code in EXPONENT_0.iter().chain(EXPONENT_3).chain(EXPONENT_4) {
            assert!(Currency::parse(code).is_ok(), "{code}");
        }
    }

    #[test]
    fn currency_parsing_names_the_problem() {
        assert_eq!(Currency::parse("EUR").unwrap().exponent(), 2);
        assert_eq!(Currency::parse("JPY").unwrap().exponent(), 0);
        assert_eq!(Currency::parse("KWD").unwrap().exponent(), 3);
        assert_eq!(
            Currency::parse("eur"),
            Err(CurrencyError::Format("eur".into()))
        );
        assert_eq!(
            Currency::parse("EURO"),
            Err(CurrencyError::Format("EURO".into()))
        );
        assert_eq!(
            Currency::parse("ABC"),
            Err(CurrencyError::Unknown("ABC".into()))
        );
    }
}
