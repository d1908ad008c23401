package org.omi.fhirstore;

import java.io.IOException;
import java.io.Reader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Properties;

/**
 * The store's settings: one properties file written by the Python launcher (omi_dsf.fhirstore).
 * Secrets are never in it, only the names of files holding them.
 */
public final class Settings {
	private static Settings current;
	private final Properties props;

	private Settings(Properties props) {
		this.props = props;
	}

	static Settings load(Path file) throws IOException {
		Properties p = new Properties();
		try (Reader r = Files.newBufferedReader(file, StandardCharsets.UTF_8)) {
			p.load(r);
		}
		current = new Settings(p);
		return current;
	}

	static Settings current() {
		if (current == null) throw new IllegalStateException("settings not loaded");
		return current;
	}

	String get(String key, String dflt) {
		String v = props.getProperty(key);
		return v == null || v.isBlank() ? dflt : v.trim();
	}

	String require(String key) {
		String v = get(key, null);
		if (v == null) throw new SettingsError("setting " + key + " is missing");
		return v;
	}

	int integer(String key, int dflt) {
		String v = get(key, null);
		if (v == null) return dflt;
		try {
			return Integer.parseInt(v);
		} catch (NumberFormatException e) {
			throw new SettingsError("setting " + key + " is not a whole number: " + v);
		}
	}

	boolean bool(String key, boolean dflt) {
		String v = get(key, null);
		if (v == null) return dflt;
		if (v.equals("true") || v.equals("false")) return v.equals("true");
		throw new SettingsError("setting " + key + " is not true or false: " + v);
	}

	/** The first line of the file named by the setting, or "" when the setting is absent. */
	String secret(String key) {
		String file = get(key, null);
		if (file == null) return "";
		try {
			String text = Files.readString(Path.of(file), StandardCharsets.UTF_8);
			int nl = text.indexOf('\n');
			return (nl < 0 ? text : text.substring(0, nl)).trim();
		} catch (IOException e) {
			throw new SettingsError("setting " + key + ": cannot read " + file + " (" + e.getClass().getSimpleName() + ")");
		}
	}

	String dialect() {
		String url = require("db.url");
		if (url.startsWith("jdbc:h2:")) return "ca.uhn.fhir.jpa.model.dialect.HapiFhirH2Dialect";
		if (url.startsWith("jdbc:postgresql:")) return "ca.uhn.fhir.jpa.model.dialect.HapiFhirPostgresDialect";
		throw new SettingsError("setting db.url: only jdbc:h2: and jdbc:postgresql: are supported");
	}

	static final class SettingsError extends RuntimeException {
		SettingsError(String message) {
			super(message);
		}
	}
}
