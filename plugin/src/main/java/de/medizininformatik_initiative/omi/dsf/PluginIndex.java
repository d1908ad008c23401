package de.medizininformatik_initiative.omi.dsf;

import java.io.IOException;
import java.io.InputStream;
import java.time.LocalDate;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;

/**
 * What the Python build generated from the spec: plugin name, version, models, resources per
 * process and the plugin's CodeSystem. Keeps the Java glue free of anything process-specific.
 */
public final class PluginIndex
{
	public static final String RESOURCE = "/omi-plugin.properties";
	public static final String ORGANIZATION_ROLE_SYSTEM = "http://dsf.dev/fhir/CodeSystem/organization-role";

	private static final PluginIndex INSTANCE = load();

	private final Properties properties;

	private PluginIndex(Properties properties)
	{
		this.properties = properties;
	}

	public static PluginIndex get()
	{
		return INSTANCE;
	}

	private static PluginIndex load()
	{
		try (InputStream in = PluginIndex.class.getResourceAsStream(RESOURCE))
		{
			if (in == null)
				throw new IllegalStateException(RESOURCE + " missing from the plugin jar; build it with 'python -m omi_dsf build'");
			Properties p = new Properties();
			p.load(in);
			return new PluginIndex(p);
		}
		catch (IOException e)
		{
			throw new IllegalStateException("Cannot read " + RESOURCE, e);
		}
	}

	private String required(String key)
	{
		String value = properties.getProperty(key);
		if (value == null || value.isBlank())
			throw new IllegalStateException(RESOURCE + ": '" + key + "' missing");
		return value.trim();
	}

	static List<String> list(String value)
	{
		return value == null || value.isBlank() ? List.of()
				: Arrays.stream(value.split(",")).map(String::trim).filter(s -> !s.isEmpty()).toList();
	}

	public String getName()
	{
		return required("name");
	}

	public String getVersion()
	{
		return required("version");
	}

	public LocalDate getReleaseDate()
	{
		return LocalDate.parse(required("release-date"));
	}

	public List<String> getProcessModels()
	{
		return list(required("process-models"));
	}

	public Map<String, List<String>> getFhirResourcesByProcessId()
	{
		Map<String, List<String>> byProcess = new LinkedHashMap<>();
		for (String processId : list(required("process-ids")))
			byProcess.put(processId, list(required("resources." + processId)));
		return byProcess;
	}

	public String getCodeSystem()
	{
		return required("code-system");
	}

	public String getParentOrganization()
	{
		return required("parent-organization");
	}

	/** The value type (string, integer, boolean, decimal) of a code of the plugin's CodeSystem. */
	public String getType(String code)
	{
		return properties.getProperty("type." + code, "string");
	}
}
